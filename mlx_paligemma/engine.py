"""The generation engine: every prompt is a row of one batch that shares each decode step.

A row's prefix (image tokens, bos, prompt, "\\n") goes through the decoder whole, on a cache of its own, so its
bidirectional attention is exact; rows that arrive together are prefilled together, left-padded. The new rows' keys
and values then join the running batch's buffers, every row right-aligned, and from there on a compiled step feeds
one token per row. Rows leave when they finish (eos, a stop string, their max_tokens, the context) or are
cancelled, and waiting prompts join at the next step: continuous batching. One prompt is simply a batch of one.

    engine = Engine(model, processor, batch_size=8)
    uid = engine.submit(images=img, prompt="caption en", max_tokens=50)
    with engine.running():
        while engine.has_work:
            for out in engine.step():   # Output(uid, token, text, finish_reason, ...)
                ...
"""

import hashlib
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .language import prefix_lm_mask
from .model import PaliGemma
from .processor import InputError, PaliGemmaProcessor

CLEAR_CACHE_EVERY = 256  # decode steps between returning MLX's buffer cache to the system
# Prompt tokens prefilled together at most (one prompt longer than this still goes alone): the activations of a
# prefill grow with it, and a batch of 448 or 896 px prompts prefilled at once would add gigabytes to the peak.
PREFILL_TOKENS = 2048


@dataclass
class Request:
    """One prompt and how to answer it. `prompt_ids` is the unpadded prefix; `pixel_values` (N, H, W, 3) its
    images, or `image_features` (N, T, D) when already computed."""

    prompt_ids: List[int]
    pixel_values: Optional[np.ndarray] = None
    image_features: Optional[mx.array] = None
    max_tokens: int = 100
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    sampler: Optional[Callable[[mx.array], mx.array]] = None  # replaces temperature/top_p/top_k/min_p

    def __post_init__(self):
        check_generation_args(self.max_tokens, self.temperature, self.top_p, self.top_k, self.min_p,
                              self.repetition_penalty, self.repetition_context_size, self.seed)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InputError("stop must be a list of non-empty strings")


def check_generation_args(max_tokens=100, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                          repetition_penalty=None, repetition_context_size=20, seed=None) -> None:
    """The one check of generation settings, for the API and every command line: one line per problem."""
    def number(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {v!r}")

    def integer(name, v, low):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InputError(f"{name} must be an integer >= {low}, got {v!r}")

    integer("max_tokens", max_tokens, 1)
    number("temperature", temperature)
    if temperature < 0 or 0 < temperature < 1e-4:
        # Dividing log-probabilities by less overflows float32 and would sample at random, not nearly greedily.
        raise InputError(f"temperature must be 0 (greedy) or at least 1e-4, got {temperature}")
    number("top_p", top_p)
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    integer("top_k", top_k, 0)
    number("min_p", min_p)
    if not 0 <= min_p <= 1:
        raise InputError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None:
        number("repetition_penalty", repetition_penalty)
        if repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    integer("repetition_context_size", repetition_context_size, 1)
    if seed is not None:
        integer("seed", seed, 0)
        if seed >= 2**64:
            raise InputError(f"seed must be below 2**64, got {seed}")


@dataclass
class Output:
    """What one row produced in one step."""

    uid: int
    token: int
    text: str  # the new piece of text (may be empty while a character or a stop string is incomplete)
    finish_reason: Optional[str]  # "stop" (eos or a stop string), "length", or None while running
    prompt_tokens: int
    generation_tokens: int


class Detokenizer:
    """Text as it grows, one token at a time, equal to decoding all the tokens at once.

    Only a short window is decoded per token: the tokens not yet handed out, after those of the last piece as
    context (for the tokenizer's leading-space rule; a piece always ends on a whole character), so the cost does
    not grow with the answer. mlx-lm's streaming
    detokenizers do the same but need a transformers tokenizer, which this package does not load."""

    def __init__(self, decode: Callable[[List[int]], str], byte_ids: frozenset = frozenset()):
        self.decode = decode
        self.byte_ids = byte_ids  # <0xNN> pieces: a run of them decodes as a whole, valid UTF-8 or not
        self.tokens: List[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] is decoded context; tokens[read:] is not yet handed out

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if token in self.byte_ids or not self.decode([token]):
            return ""  # a byte, or an id decoding skips, may sit inside a run of bytes: wait for its end
        text = self.decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is incomplete: hold it until its last byte arrives
        return self._advance(text)

    def flush(self) -> str:
        """What is still held back, when the answer ends."""
        return self._advance(self.decode(self.tokens[self.prefix:]))

    def _advance(self, text: str) -> str:
        before = self.decode(self.tokens[self.prefix:self.read])
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


class FeatureCache:
    """Image features by the image's pixels, so repeated questions about one image run the vision tower once.
    Features only, never a prompt's KV cache: image tokens attend to the prompt. Entries belong to the weights
    they were computed with and are dropped when the vision tower or the projector is given new weights."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: "OrderedDict[bytes, mx.array]" = OrderedDict()
        self.version: Optional[tuple] = None
        self.images_encoded = 0  # vision tower runs, per image, for tests and statistics

    def features(self, model: PaliGemma, pixel_values: List[np.ndarray]) -> List[mx.array]:
        from mlx.utils import tree_flatten

        weights = (model.vision_tower.parameters(), model.multi_modal_projector.parameters())
        version = tuple(id(w) for _, w in tree_flatten(weights))
        if version != self.version:
            self.entries.clear()
            self.version = version
        keys = [hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=16).digest() for p in pixel_values]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        if missing:
            first = {k: p for k, p in zip(keys, pixel_values)}
            features = model.encode_images(mx.array(np.stack([first[k] for k in missing])))
            self.images_encoded += len(missing)
            for k, f in zip(missing, features):
                self.entries[k] = f
        out = []
        for k in keys:
            self.entries.move_to_end(k)
            out.append(self.entries[k])
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out


def feature_cache(model: PaliGemma) -> FeatureCache:
    """The model's own feature cache, shared by every engine on it (generate, stream_generate, servers)."""
    cache = getattr(model, "_feature_cache", None)
    if cache is None:
        cache = FeatureCache()
        object.__setattr__(model, "_feature_cache", cache)  # a plain attribute, not a parameter
    return cache


def byte_ids(processor: PaliGemmaProcessor) -> frozenset:
    pieces = (processor.tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in pieces if i is not None)


@dataclass
class _Row:
    uid: int
    request: Request
    detokenizer: Optional[Detokenizer]
    key: Optional[mx.array] = None  # its own random stream, so a seeded row samples the same in any batch
    processors: List[Any] = field(default_factory=list)
    history: Optional[mx.array] = None  # prompt and answer ids, for the repetition penalty
    generated: int = 0
    text: str = ""  # answer text so far, of which `sent` characters were handed out
    sent: int = 0
    cancelled: bool = False


KV_BLOCK = 256  # buffer positions are added this many at a time, so a compiled step sees few distinct shapes


def _round_up(n: int) -> int:
    return -(-n // KV_BLOCK) * KV_BLOCK


class _SlotCache:
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
    rebuilding its graph: 3x fewer milliseconds per token on a small model). Kept on the model, so every engine
    reuses the traces; weights are read at each call, so trained or fused weights are seen."""
    steps = getattr(model, "_decode_steps", None)
    if steps is None:
        steps = {}
        object.__setattr__(model, "_decode_steps", steps)  # a plain attribute, not a parameter
    if (bits, group_size) not in steps:
        def step(tokens, length, left_padding, keys, values):
            caches = [_SlotCache(k, v, length, bits, group_size) for k, v in zip(keys, values)]
            key_valid = mx.arange(keys[0][0].shape[2])[None] >= left_padding[:, None]
            positions = length - left_padding + 1  # real tokens so far, counted from 1
            logits = model.language_model.forward(
                model.language_model.embed(tokens[:, None]), caches, positions,
                lambda window: prefix_lm_mask(False, key_valid, length, 1, window))
            return logits[:, -1], [c.keys for c in caches], [c.values for c in caches]

        # Only the decoder's weights are inputs: compiling swaps the array objects it traces, and the image-feature
        # cache tells new vision weights by the identity of theirs.
        steps[(bits, group_size)] = mx.compile(step, inputs=[model.language_model.state])
    return steps[(bits, group_size)]


class _Batch:
    """Running rows: their keys and values (per layer, a tuple of buffers of KV_BLOCK-rounded size, rows
    right-aligned at `length`), their left padding, and the pending token of each row."""

    def __init__(self, rows: List[_Row], keys: List[tuple], values: List[tuple], left_padding: List[int],
                 length: int, tokens: Optional[mx.array]):
        self.rows, self.keys, self.values = rows, keys, values
        self.left_padding, self.length, self.tokens = left_padding, length, tokens

    def _map(self, fn) -> None:
        self.keys = [tuple(fn(b) for b in t) for t in self.keys]
        self.values = [tuple(fn(b) for b in t) for t in self.values]

    def _resize(self, start: int, length: int) -> None:
        """Keep positions start..start+length, in buffers with room for at least one more."""
        size = _round_up(length + 1)
        self._map(lambda b: mx.pad(b[:, :, start : start + length], [(0, 0), (0, 0), (0, size - length), (0, 0)]))
        self.length = length

    def reserve(self) -> None:
        """Room for the next token."""
        if self.length + 1 > self.keys[0][0].shape[2]:
            self._resize(0, self.length)

    def keep(self, indices: List[int]) -> None:
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return  # the owner drops an empty batch
        self.left_padding = [self.left_padding[i] for i in indices]
        index = mx.array(indices, dtype=mx.int32)
        self._map(lambda b: b[index])
        if self.tokens is not None:
            self.tokens = self.tokens[index]
        trim = min(self.left_padding)
        if trim >= KV_BLOCK:  # padding every remaining row has: dropped once there is a block of it (few shapes)
            self.left_padding = [p - trim for p in self.left_padding]
            self._resize(trim, self.length - trim)

    def extend(self, other: "_Batch") -> None:
        length = max(self.length, other.length)
        size = _round_up(length + 1)

        def aligned(batch: "_Batch", b: mx.array) -> mx.array:
            shift = length - batch.length  # right-align this side's rows at the common length
            return mx.pad(b[:, :, : batch.length], [(0, 0), (0, 0), (shift, size - length), (0, 0)])

        join = lambda mine, theirs: [tuple(mx.concatenate([aligned(self, a), aligned(other, b)]) for a, b in zip(x, y))
                                     for x, y in zip(mine, theirs)]
        self.keys, self.values = join(self.keys, other.keys), join(self.values, other.values)
        self.left_padding = ([p + length - self.length for p in self.left_padding]
                             + [p + length - other.length for p in other.left_padding])
        self.length = length
        self.rows += other.rows
        self.tokens = mx.concatenate([self.tokens, other.tokens])


class Engine:
    """Rows of many requests in one batch. `submit` queues a request and returns its uid; `step` runs one
    decode step for the whole batch (admitting waiting requests first) and returns what each row produced."""

    def __init__(self, model: PaliGemma, processor: Optional[PaliGemmaProcessor] = None, batch_size: int = 8,
                 kv_bits: Optional[int] = None, prefill_tokens: int = PREFILL_TOKENS):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.processor, self.batch_size, self.prefill_tokens = model, processor, batch_size, prefill_tokens
        self.kv_bits, self.kv_group_size = kv_bits, self._kv_group_size(model, kv_bits)
        self.eos_id = processor.tokenizer.eos_id if processor is not None else model.config.eos_token_id
        self.context = model.config.text_config.max_position_embeddings  # a row ends ("length") when it is full
        self.pad_id = processor.tokenizer.pad_id if processor is not None else 0
        self.features = feature_cache(model)
        self.byte_ids = byte_ids(processor) if processor is not None else frozenset()
        self.waiting: List[_Row] = []
        self.batch: Optional[_Batch] = None
        self.next_uid = 0
        self.steps = 0

    @staticmethod
    def _kv_group_size(model: PaliGemma, kv_bits: Optional[int]) -> int:
        if kv_bits is None:
            return 64
        if kv_bits not in (4, 8):
            raise InputError(f"kv_bits must be 4 or 8, got {kv_bits!r}")
        head_dim = model.config.text_config.head_dim
        for size in (64, 32):  # MLX quantizes in groups of 32, 64 or 128 that divide the head
            if head_dim % size == 0:
                return size
        raise InputError(f"kv_bits needs a head size divisible by 32; this model's is {head_dim}")

    # Requests in, cancellations.

    def submit(self, images=None, prompt: str = "", **settings) -> int:
        """Queue a prompt about one or more images (PIL images, paths or URLs; a list for several). The images are
        read and the prompt checked now, so a bad request fails here with one InputError line."""
        if self.processor is None:
            raise InputError("this engine has no processor: submit token ids with add()")
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = self.processor(images=[images], text=prompt)
        pixels = np.array(inputs["pixel_values"]) if len(images) else None
        return self.add(Request(np.array(inputs["input_ids"])[0].tolist(), pixel_values=pixels, **settings))

    def add(self, request: Request) -> int:
        """Queue a request already in token ids."""
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        detokenizer = Detokenizer(self.processor.tokenizer.decode, self.byte_ids) if self.processor else None
        row = _Row(uid, request, detokenizer)
        if request.sampler is None and request.temperature > 0:
            seed = request.seed if request.seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
            row.key = mx.random.key(seed)
        vocab = self.model.config.text_config.vocab_size
        if request.logit_bias and not all(isinstance(t, int) and 0 <= t < vocab for t in request.logit_bias):
            raise InputError(f"logit_bias keys must be token ids in [0, {vocab})")
        if request.repetition_penalty is not None or request.logit_bias:
            from mlx_lm.sample_utils import make_logits_processors

            row.processors = make_logits_processors(request.logit_bias, request.repetition_penalty,
                                                    request.repetition_context_size)
            row.history = mx.array(request.prompt_ids[-request.repetition_context_size:])
        self.waiting.append(row)
        return uid

    def cancel(self, uid: int) -> None:
        """Stop a request; its row leaves the batch at the next step (a client that went away frees its row)."""
        self.waiting = [r for r in self.waiting if r.uid != uid]
        for r in self.batch.rows if self.batch else []:
            if r.uid == uid:
                r.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    @property
    def active(self) -> int:
        return len(self.batch.rows) if self.batch else 0

    @contextmanager
    def running(self):
        """Generation under mlx-lm's wired-memory limit (Apple silicon: the weights stay resident between
        tokens, with a warning when the model is close to the limit; a no-op elsewhere), on its generation
        stream, and MLX's buffer cache returned at the end."""
        from mlx_lm.generate import generation_stream, wired_limit

        with wired_limit(self.model, [generation_stream]):
            try:
                yield self
            finally:
                mx.clear_cache()

    # One step.

    def step(self) -> List[Output]:
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            if self.batch is not None:
                self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.cancelled])
                if not self.batch.rows:
                    self.batch = None
            self._admit()
            if self.batch is None:
                return []
            batch = self.batch
            pending, rows = batch.tokens, batch.rows
            # Rows whose pending token is their last leave before the next step is built, so no step is wasted.
            batch.keep([i for i, r in enumerate(rows) if self._room(r) > 1])
            if batch.rows:
                batch.tokens = self._decode(batch)
                mx.async_eval(batch.tokens)  # computed while this step's tokens are handed out
            else:
                self.batch = None
            outputs = [self._hand_out(row, token) for row, token in zip(rows, pending.tolist())]
            if self.batch is not None:
                done = {o.uid for o in outputs if o.finish_reason}
                batch.keep([i for i, r in enumerate(batch.rows) if r.uid not in done])
                if not batch.rows:
                    self.batch = None
            self.steps += 1
            if self.batch is None or self.steps % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()
        return outputs

    def _admit(self) -> None:
        room = self.batch_size - self.active
        if not self.waiting or room <= 0:
            return
        # One group a step, within the prefill budget; the running rows decode between groups.
        rows, tokens = [], 0
        for row in self.waiting[:room]:
            tokens += len(row.request.prompt_ids)
            if rows and tokens > self.prefill_tokens:
                break
            rows.append(row)
        self.waiting = self.waiting[len(rows):]
        new = self._prefill(rows)
        mx.clear_cache()  # the prefix's temporaries (a 4096-token prefix at 896 px) do not stay in MLX's cache
        if self.batch is None:
            self.batch = new
        else:
            self.batch.extend(new)

    def _prefill(self, rows: List[_Row]) -> _Batch:
        length = max(len(r.request.prompt_ids) for r in rows)
        left_padding = [length - len(r.request.prompt_ids) for r in rows]
        ids = mx.array([[self.pad_id] * p + r.request.prompt_ids for p, r in zip(left_padding, rows)])
        mask = None
        if any(left_padding):
            mask = mx.array([[0] * p + [1] * (length - p) for p in left_padding])
        features = self._features(rows)
        # The prefix attends to itself in full precision; its keys and values are quantized (kv_bits) after.
        cache = self.model.make_cache(left_padding=left_padding)
        logits = self.model(ids, attention_mask=mask, cache=cache, image_features=features, logits_to_keep=1)
        size = _round_up(length + 1)

        def buffers(x: mx.array) -> tuple:
            parts = mx.quantize(x, self.kv_group_size, self.kv_bits) if self.kv_bits else (x,)
            return tuple(mx.pad(p, [(0, 0), (0, 0), (0, size - length), (0, 0)]) for p in parts)

        keys, values = zip(*((buffers(k), buffers(v)) for k, v in (c.keys_and_values() for c in cache)))
        batch = _Batch(rows, list(keys), list(values), left_padding, length, None)
        batch.tokens = self._sample(rows, logits[:, -1])
        return batch

    def _features(self, rows: List[_Row]) -> Optional[mx.array]:
        pixels = [p for r in rows if r.request.pixel_values is not None for p in r.request.pixel_values]
        computed = iter(self.features.features(self.model, pixels) if pixels else [])
        features = []
        for r in rows:
            if r.request.image_features is not None:
                features.extend(r.request.image_features)
            elif r.request.pixel_values is not None:
                features.extend(next(computed) for _ in range(len(r.request.pixel_values)))
        return mx.stack(features) if features else None

    def _decode(self, batch: _Batch) -> mx.array:
        batch.reserve()
        step = decode_step(self.model, self.kv_bits, self.kv_group_size)
        logits, batch.keys, batch.values = step(batch.tokens, mx.array(batch.length), mx.array(batch.left_padding),
                                                batch.keys, batch.values)
        batch.length += 1
        return self._sample(batch.rows, logits)

    def _sample(self, rows: List[_Row], logits: mx.array) -> mx.array:
        """(B, vocab) logits -> (B,) tokens, each row by its own settings. A batch of greedy rows (the usual
        case) is one argmax; other rows are sampled one by one."""
        simple = [r.request.sampler is None and r.request.temperature == 0 and not r.processors for r in rows]
        if all(simple):
            return mx.argmax(logits, axis=-1)
        # Rows given one sampler callable (generate_step's) are sampled together by it.
        shared = rows[0].request.sampler
        if shared is not None and all(r.request.sampler is shared and not r.processors for r in rows):
            return shared(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return mx.concatenate([self._sample_row(r, logits[i : i + 1]) for i, r in enumerate(rows)])

    def _sample_row(self, row: _Row, logits: mx.array) -> mx.array:
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        request = row.request
        if row.processors:
            for processor in row.processors:
                logits = processor(row.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if request.sampler is not None:
            token = request.sampler(logprobs)
        elif request.temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            # mlx-lm's filters in make_sampler's order; the draw uses the row's own key instead of MLX's global
            # generator, whose sequence would depend on which other rows share the step.
            if 0 < request.top_p < 1:
                logprobs = apply_top_p(logprobs, request.top_p)
            if request.min_p > 0:
                logprobs = apply_min_p(logprobs, request.min_p)
            if 0 < request.top_k < logprobs.shape[-1]:
                logprobs = apply_top_k(logprobs, request.top_k)
            row.key, key = mx.random.split(row.key)
            token = mx.random.categorical(logprobs * (1 / request.temperature), key=key)
        if row.processors:
            # The penalty looks at the last repetition_context_size tokens only: keep no more.
            row.history = mx.concatenate([row.history, token])[-request.repetition_context_size:]
        return token

    def _room(self, row: _Row) -> int:
        """Tokens the row may still make: up to its max_tokens, within the model's context."""
        return min(row.request.max_tokens, self.context - len(row.request.prompt_ids)) - row.generated

    def _hand_out(self, row: _Row, token: int) -> Output:
        request = row.request
        row.generated += 1
        finish = None
        if token == self.eos_id and request.stop_at_eos:
            finish = "stop"
        elif self._room(row) <= 0:
            finish = "length"
        piece = ""
        if row.detokenizer is not None:
            if token != self.eos_id:
                row.text += row.detokenizer.add(token)
            if finish:
                row.text += row.detokenizer.flush()
            piece, stopped = self._release(row, final=finish is not None)
            if stopped:
                finish = "stop"
        return Output(row.uid, token, piece, finish, len(request.prompt_ids), row.generated)

    @staticmethod
    def _release(row: _Row, final: bool):
        """The text that can be handed out now: up to a stop string (which ends the row and is not shown), and
        short of a tail that could still become one."""
        stops = row.request.stop
        if stops:
            found = [i for i in (row.text.find(s, max(row.sent - len(s), 0)) for s in stops) if i >= 0]
            if found:
                end = min(found)
                piece, row.sent = row.text[row.sent:end], end
                return piece, True
        end = len(row.text)
        if stops and not final:
            # A stop string can only begin in the text not yet handed out (what was handed out was checked), so the
            # search looks at that tail only: a few characters a token, not len(stop) ** 2 (a 1 MB stop froze it).
            unsent = len(row.text) - row.sent
            held = max((n for s in stops for n in range(1, min(len(s), unsent + 1)) if row.text.endswith(s[:n])),
                       default=0)
            end = max(end - held, row.sent)
        piece, row.sent = row.text[row.sent:end], end
        return piece, False
