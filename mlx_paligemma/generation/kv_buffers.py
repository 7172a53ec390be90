"""The running rows' keys and values: fixed-size buffers, rows right-aligned, and the compiled decode step."""

from typing import Callable, List, Optional

import mlx.core as mx

from .kept import kept
from ..models.adapters import row_adapters
from ..models.language import prefix_lm_mask
from ..models.paligemma import PaliGemma

KV_BLOCK = 256  # buffer positions are added this many at a time, so a compiled step sees few distinct shapes


def round_up(n: int) -> int:
    return -(-n // KV_BLOCK) * KV_BLOCK


class SlotCache:
    """One layer's keys and values in fixed-size buffers, written at position `index` (an array), quantized when
    `bits` is set (mx.quantize's packed, scales, biases; the same numbers as mlx-lm's QuantizedKVCache).

    mlx-lm's caches hand back a view that grows by one position per step; a compiled decode step needs inputs
    whose shapes stay put, so here the whole buffer is attended to and the mask hides what is not written yet."""

    def __init__(self, keys: tuple, values: tuple, index: mx.array, bits: Optional[int], group_size: int):
        self.keys, self.values, self.index, self.bits, self.group_size = keys, values, index, bits, group_size

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self.keys, self.values = (self._write(buf, new) for buf, new in ((self.keys, k), (self.values, v)))
        return self._read(self.keys), self._read(self.values)

    def _write(self, buffers: tuple, new: mx.array) -> tuple:
        parts = mx.quantize(new, self.group_size, self.bits) if self.bits else (new,)
        return tuple(mx.slice_update(b, p, self.index, axes=(2,)) for b, p in zip(buffers, parts))

    def _read(self, buffers: tuple) -> mx.array:
        return mx.dequantize(*buffers, group_size=self.group_size, bits=self.bits) if self.bits else buffers[0]


def decode_step(model: PaliGemma, bits: Optional[int], group_size: int) -> Callable:
    """One token per row through the decoder, compiled (MLX fuses the step's elementwise work and skips
    rebuilding its graph: 3x fewer milliseconds per token on a small model). Kept for the model (kept.py), so every
    engine reuses the traces; weights are read at each call, so trained or fused weights are seen."""
    steps = kept(model).setdefault("decode_steps", {})
    if (bits, group_size) not in steps:
        def step(tokens, length, left_padding, keys, values, adapters):
            caches = [SlotCache(k, v, length, bits, group_size) for k, v in zip(keys, values)]
            key_valid = mx.arange(keys[0][0].shape[2])[None] >= left_padding[:, None]
            positions = length - left_padding + 1  # real tokens so far, counted from 1
            # Each row's adapter index (-1: the base) is an input of the step, handed to the adapted layers here,
            # inside the trace, so every call reads its own.
            with row_adapters(model, adapters):
                logits = model.language_model.forward(
                    model.language_model.embed(tokens[:, None]), caches, positions,
                    lambda window: prefix_lm_mask(False, key_valid, length, 1, window))
            return logits[:, -1], [c.keys for c in caches], [c.values for c in caches]

        # Only the decoder's weights are inputs: compiling swaps the array objects it traces, and the image-feature
        # cache tells new vision weights by the identity of theirs.
        steps[(bits, group_size)] = mx.compile(step, inputs=[model.language_model.state])
    return steps[(bits, group_size)]


class KVBuffers:
    """The running rows' keys and values, from their prefill (prefill.py writes them here) to their last decode
    step: per layer a tuple of buffers of KV_BLOCK-rounded size, rows right-aligned at `length`, each row's left
    padding in front of its own tokens (its length: `lengths`). A row's tail can be dropped (`trim`), so rows need
    not be the same length and a token taken back (a refused draft, a prefix shared and then left) costs a shift of
    that row, not the batch."""

    def __init__(self, keys: List[tuple], values: List[tuple], left_padding: List[int], length: int):
        self.keys, self.values, self.left_padding, self.length = keys, values, left_padding, length

    def _map(self, fn) -> None:
        self.keys = [tuple(fn(b) for b in t) for t in self.keys]
        self.values = [tuple(fn(b) for b in t) for t in self.values]

    def _resize(self, start: int, length: int) -> None:
        """Keep positions start..start+length, in buffers with room for at least one more."""
        size = round_up(length + 1)
        self._map(lambda b: mx.pad(b[:, :, start : start + length], [(0, 0), (0, 0), (0, size - length), (0, 0)]))
        self.length = length

    def reserve(self) -> None:
        """Room for the next token."""
        if self.length + 1 > self.keys[0][0].shape[2]:
            self._resize(0, self.length)

    def take(self, indices: List[int], index: mx.array) -> None:
        """Keep these rows (`index`: the same as an array)."""
        self.left_padding = [self.left_padding[i] for i in indices]
        self._map(lambda b: b[index])
        trim = min(self.left_padding)
        if trim >= KV_BLOCK:  # padding every remaining row has: dropped once there is a block of it (few shapes)
            self.left_padding = [p - trim for p in self.left_padding]
            self._resize(trim, self.length - trim)

    def extend(self, other: "KVBuffers") -> None:
        length = max(self.length, other.length)
        size = round_up(length + 1)

        def aligned(kv: "KVBuffers", b: mx.array) -> mx.array:
            shift = length - kv.length  # right-align this side's rows at the common length
            return mx.pad(b[:, :, : kv.length], [(0, 0), (0, 0), (shift, size - length), (0, 0)])

        join = lambda mine, theirs: [tuple(mx.concatenate([aligned(self, a), aligned(other, b)]) for a, b in zip(x, y))
                                     for x, y in zip(mine, theirs)]
        self.keys, self.values = join(self.keys, other.keys), join(self.values, other.values)
        self.left_padding = ([p + length - self.length for p in self.left_padding]
                             + [p + length - other.length for p in other.left_padding])
        self.length = length

    @property
    def lengths(self) -> List[int]:
        """Each row's tokens (prompt and answer so far)."""
        return [self.length - p for p in self.left_padding]

    def trim(self, counts: List[int]) -> None:
        """Drop the last counts[i] tokens of row i: the row moves right by that much, into its padding, and its
        next token is written where every row's is. Positions (RoPE) count a row's real tokens, so the kept keys
        stay where they were computed."""
        if not any(counts):
            return
        if any(c < 0 or c > n for c, n in zip(counts, self.lengths)):
            raise ValueError(f"cannot trim {counts} tokens off rows of {self.lengths}")
        size = self.keys[0][0].shape[2]
        source = mx.maximum(mx.arange(size)[None] - mx.array(counts)[:, None], 0)  # (B, size) position read
        self._map(lambda b: mx.take_along_axis(b, source[:, None, :, None], axis=2))
        self.left_padding = [p + c for p, c in zip(self.left_padding, counts)]

    def copy_rows(self, index: List[int]) -> None:
        """Row i takes the keys and values of row index[i] (a beam continuing another beam)."""
        self._map(lambda b: b[mx.array(index, dtype=mx.int32)])
