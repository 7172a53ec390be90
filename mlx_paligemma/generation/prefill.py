"""A prefill under way: the object the engine advances, one bounded piece at a time.

A row's prefix (image tokens, bos, prompt, "\\n") attends to itself in full, so it cannot be split by tokens through
the cache the way a causal prompt can: its first tokens attend to its last at every layer. It is split by work
instead, in this order:
- the images' features, one image a piece (features.py keeps them, so a repeated image costs nothing);
- per layer, the queries, keys and values of one block of TOKEN_BLOCK tokens a piece (each token's own);
- per layer, one block of queries a piece (fewer the longer the prefix, ATTENTION_PAIRS): its attention over all
  the layer's keys, o_proj and the MLP (each token's own again).
Every schedule runs the same operations on the same shapes, so the numbers never depend on how many engine steps a
prefill took. The keys and values are written once, in the KVBuffers the decode steps read (kv_bits quantizes them
after the prefix has attended to them in full precision). A group of rows (left-padded to the longest) is
prefilled together; the rows of one request (beams, choices, forced continuations) share one prefill of its prompt.
"""

from typing import Iterator, List, Optional

import mlx.core as mx

from ..models.adapters import row_adapters
from ..models.language import prefix_lm_mask, real_positions
from ..models.paligemma import PaliGemma
from .adapters import adapter_ids
from .features import FeatureCache
from .kv_buffers import KVBuffers, round_up

TOKEN_BLOCK = 512  # tokens of one position-wise piece: a 4096-token prefix is 8 pieces a layer
# Query-key pairs of one attention piece: its queries are fewer the more keys they attend to, so a piece of an
# 8,000-token prefix costs what one of a 2,048-token prefix does.
ATTENTION_PAIRS = 512 * 2048


class Prefill:
    """The prefill of `rows` (the first row of each request is prefilled; the others copy it). `advance()` does
    the next piece; once `done`, `logits` are each request's last-position logits and `kv` the rows' buffers."""

    def __init__(self, model: PaliGemma, rows: list, features: FeatureCache, pad_id: int, kv_bits: Optional[int],
                 kv_group_size: int):
        self.model, self.rows, self.cache = model, rows, features
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.firsts, copies = [], []
        for r in rows:  # a request's rows are next to each other
            if not self.firsts or self.firsts[-1].request is not r.request:
                self.firsts.append(r)
            copies.append(len(self.firsts) - 1)
        self.copies = mx.array(copies) if len(self.firsts) < len(rows) else None
        prompts = [r.request.prompt_ids for r in self.firsts]
        self.length = max(map(len, prompts))
        self.left_padding = [self.length - len(p) for p in prompts]
        self.ids = mx.array([[pad_id] * p + ids for p, ids in zip(self.left_padding, prompts)])
        self.logits: Optional[mx.array] = None
        self.kv: Optional[KVBuffers] = None
        self._pieces = self._work()

    @property
    def done(self) -> bool:
        return self.logits is not None

    def advance(self) -> None:
        """Build and compute the next piece."""
        with row_adapters(self.model, adapter_ids(self.model, self.firsts)):  # rows of different adapters, one pass
            piece = next(self._pieces)
        if piece is not None:
            mx.eval(piece)

    def _work(self) -> Iterator:
        """Yields each piece's arrays as it builds them; None once the logits and the buffers are made."""
        model, lm = self.model, self.model.language_model
        features = yield from self._features()
        h = model.embed(self.ids, features).astype(mx.float32)  # the residual stream, as in LanguageModel.forward
        key_valid = mx.array([[0] * p + [1] * (self.length - p) for p in self.left_padding]) if any(
            self.left_padding) else None
        positions = real_positions(key_valid, self.length) if key_valid is not None else mx.array(1)
        # Every token of a prefill is in the prefix: each attends to every real key, whatever the layer's window.
        mask = prefix_lm_mask(None, key_valid.astype(mx.bool_) if key_valid is not None else None, 0, self.length)
        spans = blocks(self.length, TOKEN_BLOCK)
        queries = blocks(self.length, min(TOKEN_BLOCK, max(16, ATTENTION_PAIRS // self.length // 16 * 16)))
        keys, values = [], []
        for layer in lm.model.layers:
            attention, qs, ks, vs = layer.self_attn, [], [], []
            for s, e in spans:
                q, k, v = attention.project(layer.input_layernorm(h[:, s:e]), positions + s)
                for kept, x in zip((qs, ks, vs), (q, k, v)):
                    kept.append(x)
                yield [q, k, v]
            q, k, v = (x[0] if len(x) == 1 else mx.concatenate(x, axis=2) for x in (qs, ks, vs))
            out = []
            for s, e in queries:
                out.append(layer.finish(h[:, s:e], attention.output(q[:, :, s:e], k, v, mask)))
                yield out[-1]
            h = out[0] if len(out) == 1 else mx.concatenate(out, axis=1)
            keys.append(self._stored(k))
            values.append(self._stored(v))
            yield [h, *keys[-1], *values[-1]]  # the layer's end: its full-precision keys and values are let go
        logits = lm.head(h[:, -1:])[:, -1]
        self.kv = KVBuffers(keys, values, [self.left_padding[i] for i in self._copied()], self.length)
        self.logits = logits if self.copies is None else logits[self.copies]
        yield None

    def _features(self):
        """The images' features (N, T, D), one image's encoding a piece; None for prompts without images."""
        pixels = [p for r in self.firsts if r.request.image_features is None and r.request.pixel_values is not None
                  for p in r.request.pixel_values]
        keys, found = self.cache.lookup(self.model, pixels)
        for key, p in zip(keys, pixels):
            if key not in found:  # an image twice in the group is encoded once
                found[key] = self.cache.encode(self.model, key, p)
                yield found[key]
        computed = iter(keys)
        features = []
        for r in self.firsts:
            if r.request.image_features is not None:
                features.extend(r.request.image_features)
            elif r.request.pixel_values is not None:
                features.extend(found[next(computed)] for _ in range(len(r.request.pixel_values)))
        return mx.stack(features) if features else None

    def _copied(self) -> List[int]:
        return self.copies.tolist() if self.copies is not None else list(range(len(self.firsts)))

    def _stored(self, x: mx.array) -> tuple:
        """A layer's keys or values as the decode steps keep them: one copy per row, quantized with kv_bits, with
        room for the tokens to come."""
        if self.copies is not None:
            x = x[self.copies]
        parts = mx.quantize(x, self.kv_group_size, self.kv_bits) if self.kv_bits else (x,)
        size = round_up(self.length + 1)
        return tuple(mx.pad(p, [(0, 0), (0, 0), (0, size - self.length), (0, 0)]) for p in parts)


def blocks(length: int, size: int) -> List[tuple]:
    return [(s, min(s + size, length)) for s in range(0, length, size)]
