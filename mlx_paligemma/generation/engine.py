"""The generation engine: every prompt is a row of one batch that shares each decode step.

A row's prefix (image tokens, bos, prompt, "\\n") goes through the decoder whole, on a cache of its own, so its
bidirectional attention is exact; rows that arrive together are prefilled together, left-padded. The new rows' keys
and values then join the running batch's buffers, every row right-aligned, and from there on a compiled step feeds
one token per row. Rows leave when they finish (eos, a stop string, their max_tokens, the context) or are
cancelled, and waiting prompts join at the next step: continuous batching. One prompt is simply a batch of one.

A request (request.py) is one row, or several sharing one prefill of their prompt: a beam search is num_beams rows,
a best_of request best_of sampled rows, and a scoring request one row per candidate (tokens fed, not chosen): rows of the
same batch that share one prefill of their prompt. A row may carry a constraint (structured output), a token mask
applied before any picking; constrained and free rows share steps. Every token comes with its log-probability.
Below the engine: constraints.py (the masks), sampling.py (samplers, log-probabilities), beams.py (transformers'
beam bookkeeping), kv_buffers.py (the KV buffers and the compiled step), detokenizer.py, features.py (the
image-feature cache).

    engine = Engine(model, processor, batch_size=8)
    uid = engine.submit(images=img, prompt="caption en", max_tokens=50)
    with engine.running():
        while engine.has_work:
            for out in engine.step():   # Output(uid, token, text, finish_reason, logprob, ...)
                ...
"""

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .adapters import adapter_ids, check_adapter
from .beams import BeamGroup, BeamSequence
from .constraints import Constraint, apply_masks, make_constraint
from ..processing.detokenizer import Detokenizer, byte_ids
from .features import FeatureCache, feature_cache
from .kv_buffers import Batch, decode_step, round_up
from ..models.adapters import row_adapters
from ..models.paligemma import PaliGemma
from ..errors import InputError
from ..processing.processor import PaliGemmaProcessor
from .request import Request
from .sampling import Picked, log_softmax, sample, token_logprobs, top_logprobs

__all__ = ["Engine", "Request", "Output", "Detokenizer", "byte_ids", "FeatureCache", "feature_cache", "BeamSequence"]

CLEAR_CACHE_EVERY = 256  # decode steps between returning MLX's buffer cache to the system
# Prompt tokens prefilled together at most (one prompt longer than this still goes alone): the activations of a
# prefill grow with it, and a batch of 448 or 896 px prompts prefilled at once would add gigabytes to the peak.
PREFILL_TOKENS = 2048


def own(constraint: Optional[Constraint]) -> Optional[Constraint]:
    """A row's own copy of its request's constraint (the request's stays at the start, for every row)."""
    return None if constraint is None else constraint.copy()


@dataclass
class Output:
    """What one row produced in one step."""

    uid: int
    token: int
    text: str  # the new piece of text (may be empty while a character or a stop string is incomplete)
    finish_reason: Optional[str]  # "stop" (eos or a stop string), "length", or None while running
    prompt_tokens: int
    generation_tokens: int
    logprob: Optional[float] = None  # the token's log-probability (None on a beam search's result)
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # (id, log-probability), most likely first, when asked
    index: int = 0  # which of its request's rows (a forced continuation's position in `forced`)
    sequences: Optional[List[BeamSequence]] = None  # beams, best_of: the best num_return_sequences, best first


@dataclass
class _Row:
    uid: int
    request: Request
    detokenizer: Optional[Detokenizer]
    key: Optional[mx.array] = None  # its own random stream, so a seeded row samples the same in any batch
    processors: List[Any] = field(default_factory=list)
    history: Optional[mx.array] = None  # prompt and answer ids, for the repetition penalty
    generated: int = 0  # tokens handed out
    picked: int = 0  # tokens chosen (one ahead of those handed out while a step is under way)
    text: str = ""  # answer text so far, of which `sent` characters were handed out
    sent: int = 0
    cancelled: bool = False
    index: int = 0
    forced: Optional[List[int]] = None
    beams: Optional[BeamGroup] = None  # shared by the rows of one beam search
    samples: Optional[List[Optional[BeamSequence]]] = None  # shared by the rows of a best_of: each one's answer
    tokens: List[int] = field(default_factory=list)  # a best_of row's tokens and their log-probabilities
    values: List[float] = field(default_factory=list)
    finished: bool = False  # a best_of row that ended while the others go on
    constraint: Optional[Constraint] = None  # the row's own grammar state (a beam's follows its parent's)


class Engine:
    """Rows of many requests in one batch. `submit` queues a request and returns its uid; `step` runs one
    decode step for the whole batch (admitting waiting requests first) and returns what each row produced."""

    def __init__(self, model: PaliGemma, processor: Optional[PaliGemmaProcessor] = None, batch_size: int = 8,
                 kv_bits: Optional[int] = None, prefill_tokens: int = PREFILL_TOKENS, batch_invariant: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.processor, self.batch_size, self.prefill_tokens = model, processor, batch_size, prefill_tokens
        self.kv_bits, self.kv_group_size = kv_bits, self._kv_group_size(model, kv_bits)
        self.eos_id = processor.tokenizer.eos_id if processor is not None else model.config.eos_token_id
        self.context = model.config.text_config.max_position_embeddings  # a row ends ("length") when it is full
        self.pad_id = processor.tokenizer.pad_id if processor is not None else 0
        self.features = feature_cache(model)
        self.byte_ids = byte_ids(processor) if processor is not None else frozenset()
        # batch_invariant: every request in batches of its own (its own prefill, keys and values, decode step and
        # image features, computed image by image), so its tokens and log-probabilities are bitwise what it gets
        # alone, whatever runs beside it. Float rounding otherwise follows the batch's shape (matmul blocking,
        # the reductions' split over padded lengths).
        self.batch_invariant = batch_invariant
        self.waiting: List[_Row] = []
        self.batches: List[Batch] = []  # one, or one per request when batch_invariant
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

    def submit(self, images=None, prompt: str = "", response_format=None, json_schema=None, regex=None,
               choices=None, constrain: bool = False, **settings) -> int:
        """Queue a prompt about one or more images (PIL images, paths or URLs; a list for several). The images are
        read and the prompt checked now, so a bad request fails here with one InputError line. At most one of
        response_format (OpenAI's), json_schema, regex, choices or constrain=True (the detect/segment grammar)
        keeps the answer inside it (see constraints.make_constraint); a bad one fails here too."""
        if self.processor is None:
            raise InputError("this engine has no processor: submit token ids with add()")
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(constrain, bool):
            raise InputError(f"constrain must be true or false, got {constrain!r}")
        constraint = make_constraint(self.processor, self.model.config.text_config.vocab_size, prompt,
                                     response_format, json_schema, regex, choices, constrain)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = self.processor(images=[images], text=prompt)
        pixels = np.array(inputs["pixel_values"]) if len(images) else None
        return self.add(Request(np.array(inputs["input_ids"])[0].tolist(), pixel_values=pixels,
                                constraint=constraint, **settings))

    def add(self, request: Request) -> int:
        """Queue a request already in token ids. A beam search is num_beams rows, forced continuations one row
        each; they come and go together and share one prefill."""
        check_adapter(self.model, request.adapter)
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        vocab = self.model.config.text_config.vocab_size
        if request.forced and not all(0 <= t < vocab for f in request.forced for t in f):
            raise InputError(f"forced tokens must be token ids in [0, {vocab})")
        if request.forced and max(map(len, request.forced)) > self.context - len(request.prompt_ids):
            raise InputError(f"a continuation of {max(map(len, request.forced))} tokens after a prompt of "
                             f"{len(request.prompt_ids)} runs past the model's context of {self.context}")
        if request.num_beams > 1:
            group = BeamGroup(request.num_beams, request.length_penalty, request.early_stopping, self.eos_id,
                              self._limit(request))
            self.waiting += [_Row(uid, request, None, index=i, beams=group, constraint=own(request.constraint))
                             for i in range(request.num_beams)]
            return uid
        if request.forced:
            self.waiting += [_Row(uid, request, None, index=i, forced=f) for i, f in enumerate(request.forced)]
            return uid
        if request.logit_bias and not all(isinstance(t, int) and 0 <= t < vocab for t in request.logit_bias):
            raise InputError(f"logit_bias keys must be token ids in [0, {vocab})")
        if request.best_of > 1:
            samples = [None] * request.best_of
            seed = request.seed if request.seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
            self.waiting += [self._sampled_row(uid, request, seed + i, index=i, samples=samples)
                             for i in range(request.best_of)]
            return uid
        self.waiting.append(self._sampled_row(uid, request, request.seed))
        return uid

    def _sampled_row(self, uid: int, request: Request, seed: Optional[int], **fields) -> _Row:
        detokenizer = Detokenizer(self.processor.tokenizer.decode, self.byte_ids) if self.processor else None
        row = _Row(uid, request, detokenizer, constraint=own(request.constraint), **fields)
        if request.sampler is None and request.temperature > 0:
            seed = seed if seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
            row.key = mx.random.key(seed)
        if request.repetition_penalty is not None or request.logit_bias:
            from mlx_lm.sample_utils import make_logits_processors

            row.processors = make_logits_processors(request.logit_bias, request.repetition_penalty,
                                                    request.repetition_context_size)
            row.history = mx.array(request.prompt_ids[-request.repetition_context_size:])
        return row

    def cancel(self, uid: int) -> None:
        """Stop a request; its row leaves the batch at the next step (a client that went away frees its row)."""
        self.waiting = [r for r in self.waiting if r.uid != uid]
        for r in (r for b in self.batches for r in b.rows):
            if r.uid == uid:
                r.cancelled = True

    @property
    def batch(self) -> Optional[Batch]:
        """The running batch (the first of them when batch_invariant), None when no row runs."""
        return self.batches[0] if self.batches else None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.batches)

    @property
    def active(self) -> int:
        return sum(len(b.rows) for b in self.batches)

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
            for batch in self.batches:
                batch.keep([i for i, r in enumerate(batch.rows) if not r.cancelled])
            self.batches = [b for b in self.batches if b.rows]
            self._admit()
            if not self.batches:
                return []
            started = []
            for batch in self.batches:
                pending, rows = batch.picked, batch.rows
                # Rows whose pending token is their last leave before the next step is built, so no step is wasted.
                batch.keep([i for i, r in enumerate(rows) if self._room(r) > 1])
                if batch.rows:
                    batch.picked = self._decode(batch)
                    # computed while this step's tokens are handed out
                    mx.async_eval(batch.picked.tokens, batch.picked.logprobs)
                started.append((batch, rows, pending))
            outputs = []
            for batch, rows, pending in started:
                handed = self._hand_out_all(rows, pending)
                done = {id(r) for r, o in zip(rows, handed) if o is not None and o.finish_reason or r.finished}
                batch.keep([i for i, r in enumerate(batch.rows) if id(r) not in done])
                outputs += [o for o in handed if o is not None]
            self.batches = [b for b in self.batches if b.rows]
            self.steps += 1
            if not self.batches or self.steps % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()
        return outputs

    def _admit(self) -> None:
        room = self.batch_size - self.active
        if not self.waiting or room <= 0:
            return
        # One group a step, within the prefill budget; the running rows decode between groups.
        # A request's rows (beams, forced continuations) join whole, and are prefilled once; one larger than the
        # batch goes alone.
        rows, tokens = [], 0
        for _, group in itertools.groupby(self.waiting, key=lambda r: id(r.request)):
            group = list(group)
            tokens += len(group[0].request.prompt_ids)
            alone = not rows and not self.batches
            if rows and tokens > self.prefill_tokens or len(rows) + len(group) > room and not alone:
                break
            rows += group
        if not rows:
            return
        self.waiting = self.waiting[len(rows):]
        if self.batch_invariant:
            self.batches += [self._prefill(list(g)) for _, g in itertools.groupby(rows, key=lambda r: id(r.request))]
        elif self.batches:
            self.batches[0].extend(self._prefill(rows))
        else:
            self.batches = [self._prefill(rows)]
        mx.clear_cache()  # the prefix's temporaries (a 4096-token prefix at 896 px) do not stay in MLX's cache

    def _prefill(self, rows: List[_Row]) -> Batch:
        # One prefill per request: the rows of a beam search or of forced continuations get copies of it.
        firsts, copies = [], []
        for r in rows:  # a request's rows are next to each other
            if not firsts or firsts[-1].request is not r.request:
                firsts.append(r)
            copies.append(len(firsts) - 1)
        copies = mx.array(copies)
        length = max(len(r.request.prompt_ids) for r in firsts)
        left_padding = [length - len(r.request.prompt_ids) for r in firsts]
        ids = mx.array([[self.pad_id] * p + r.request.prompt_ids for p, r in zip(left_padding, firsts)])
        mask = None
        if any(left_padding):
            mask = mx.array([[0] * p + [1] * (length - p) for p in left_padding])
        features = self._features(firsts)
        # The prefix attends to itself in full precision; its keys and values are quantized (kv_bits) after.
        cache = self.model.make_cache(left_padding=left_padding)
        with row_adapters(self.model, adapter_ids(self.model, firsts)):  # rows of different adapters, one prefill
            logits = self.model(ids, attention_mask=mask, cache=cache, image_features=features, logits_to_keep=1)
        size = round_up(length + 1)

        def buffers(x: mx.array) -> tuple:
            if len(firsts) < len(rows):
                x = x[copies]
            parts = mx.quantize(x, self.kv_group_size, self.kv_bits) if self.kv_bits else (x,)
            return tuple(mx.pad(p, [(0, 0), (0, 0), (0, size - length), (0, 0)]) for p in parts)

        keys, values = zip(*((buffers(k), buffers(v)) for k, v in (c.keys_and_values() for c in cache)))
        padding = [left_padding[i] for i in copies.tolist()]
        batch = Batch(rows, list(keys), list(values), padding, length, None)
        # Every beam starts from the same prefix: no keys and values to move after the first step.
        batch.picked, _ = self._sample(rows, logits[:, -1][copies])
        return batch

    def _features(self, rows: List[_Row]) -> Optional[mx.array]:
        pixels = [p for r in rows if r.request.pixel_values is not None for p in r.request.pixel_values]
        computed = iter(self.features.features(self.model, pixels, alone=self.batch_invariant) if pixels else [])
        features = []
        for r in rows:
            if r.request.image_features is not None:
                features.extend(r.request.image_features)
            elif r.request.pixel_values is not None:
                features.extend(next(computed) for _ in range(len(r.request.pixel_values)))
        return mx.stack(features) if features else None

    def _decode(self, batch: Batch) -> Picked:
        batch.reserve()
        step = decode_step(self.model, self.kv_bits, self.kv_group_size)
        logits, batch.keys, batch.values = step(batch.picked.tokens, mx.array(batch.length),
                                                mx.array(batch.left_padding), batch.keys, batch.values,
                                                adapter_ids(self.model, batch.rows))
        batch.length += 1
        picked, parents = self._sample(batch.rows, logits)
        if parents != list(range(len(batch.rows))):
            batch.copy_rows(parents)  # beams continue other beams: their keys and values come along
        return picked

    def _sample(self, rows: List[_Row], logits: mx.array) -> Tuple[Picked, List[int]]:
        """(B, vocab) logits -> each row's token by its own settings, with log-probabilities, and the row each
        row continues (itself, but for beams). A batch of greedy rows (the usual case) is one argmax."""
        constraints = [r.constraint for r in rows]
        constrained = any(c is not None for c in constraints)
        if constrained:
            # The step runs while the masks are computed on the CPU; forbidden tokens become -inf for every way
            # of picking (greedy, sampled, beams), and the log-probabilities are the constrained distribution's.
            mx.async_eval(logits)
            logits = apply_masks(logits, constraints)
        logprobs = log_softmax(logits)
        parents = list(range(len(rows)))
        simple = [r.request.sampler is None and r.request.temperature == 0 and not r.processors for r in rows]
        if all(simple) and not any(r.beams or r.forced for r in rows):
            tokens = mx.argmax(logits, axis=-1)
        # Rows given one sampler callable (generate_step's) are sampled together by it.
        elif (shared := rows[0].request.sampler) is not None and all(r.request.sampler is shared and not r.processors
                                                                    for r in rows):
            tokens = shared(logprobs)
        else:
            tokens = [None] * len(rows)
            for i, r in enumerate(rows):
                if r.forced is not None:
                    tokens[i] = mx.array([r.forced[min(r.picked, len(r.forced) - 1)]])
                elif r.beams is not None:
                    if r.index == 0:
                        group = [j for j, s in enumerate(rows) if s.beams is r.beams]
                        chosen, within = r.beams.step(logprobs[mx.array(group)])
                        for j, t, p in zip(group, chosen, within):
                            tokens[j], parents[j] = mx.array([t]), group[p]
                else:
                    tokens[i] = self._sample_row(r, logits[i : i + 1])
            tokens = mx.concatenate(tokens)
        for r in rows:
            r.picked += 1
        if constrained:
            self._advance(rows, parents, tokens.tolist())
        picked = Picked(tokens, token_logprobs(logprobs, tokens))
        k = max(r.request.logprobs for r in rows)
        if k:
            picked.top_ids, picked.top_values = top_logprobs(logprobs, k)
        return picked, parents

    @staticmethod
    def _advance(rows: List[_Row], parents: List[int], tokens: List[int]) -> None:
        """Each constrained row's grammar takes its token; a beam first takes over its parent's state (a copy
        when the parent goes on too), all before any advances."""
        states = [rows[p].constraint if p == j or rows[p].constraint is None else rows[p].constraint.copy()
                  for j, p in enumerate(parents)]
        for r, c, t in zip(rows, states, tokens):
            r.constraint = c
            if c is None:
                continue
            # A beam may be handed a forbidden (-inf) candidate when fewer than 2 * num_beams are allowed: it can
            # never win, and its grammar, now in error, lets it write only <eos>.
            try:
                c.advance(t)
            except ValueError:
                if r.beams is None:
                    raise

    def _sample_row(self, row: _Row, logits: mx.array) -> mx.array:
        request = row.request
        if row.processors:
            for processor in row.processors:
                logits = processor(row.history, logits)
        logprobs = log_softmax(logits)
        if request.sampler is not None:
            token = request.sampler(logprobs)
        else:
            token, row.key = sample(logprobs, request.temperature, row.key, request.top_p, request.min_p,
                                    request.top_k)
        if row.processors:
            # The penalty looks at the last repetition_context_size tokens only: keep no more.
            row.history = mx.concatenate([row.history, token])[-request.repetition_context_size:]
        return token

    def _limit(self, request: Request) -> int:
        """Tokens a request may make: its max_tokens, within the model's context."""
        return min(request.max_tokens, self.context - len(request.prompt_ids))

    def _room(self, row: _Row) -> int:
        """Tokens the row may still make."""
        if row.beams is not None:
            return 0 if row.beams.done else self._limit(row.request)
        limit = len(row.forced) if row.forced is not None else self._limit(row.request)
        return limit - row.generated

    def _hand_out_all(self, rows: List[_Row], picked: Picked) -> List[Optional[Output]]:
        tokens, logprobs = picked.tokens.tolist(), picked.logprobs.tolist()
        top = (picked.top_ids.tolist(), picked.top_values.tolist()) if picked.top_ids is not None else None
        outputs = []
        for i, row in enumerate(rows):
            if row.beams is not None:
                outputs.append(self._beam_result(row))
                continue
            out = self._hand_out(row, tokens[i])
            out.logprob, out.index = logprobs[i], row.index
            if row.samples is not None:
                outputs.append(self._best_of_result(row, out))
                continue
            if row.request.logprobs:
                k = row.request.logprobs
                out.top_logprobs = list(zip(top[0][i][:k], top[1][i][:k]))
            outputs.append(out)
        return outputs

    def _beam_result(self, row: _Row) -> Optional[Output]:
        """A beam search hands out nothing until it ends, then its best sequences, once."""
        group = row.beams
        if not group.done or group.emitted:
            return None
        group.emitted = True
        results = group.results(row.request.num_return_sequences)
        for r in results:
            if self.processor is not None:
                r.text = self.processor.tokenizer.decode([t for t in r.tokens if t != self.eos_id])
            r.finish_reason = "stop" if r.tokens[-1] == self.eos_id else "length"
        best = results[0]
        return Output(row.uid, best.tokens[-1], best.text, best.finish_reason, len(row.request.prompt_ids),
                      len(best.tokens), sequences=results)

    def _best_of_result(self, row: _Row, out: Output) -> Optional[Output]:
        """A best_of request hands out nothing until its last sample ends, then its samples, likeliest first."""
        row.tokens.append(out.token)
        row.values.append(out.logprob)
        if not out.finish_reason:
            return None
        row.finished = True
        # big_vision's score: the summed log-probability of the answer's tokens, <eos> included (stable: the first
        # of equal scores wins, as its argmax).
        row.samples[row.index] = BeamSequence(row.tokens, math.fsum(row.values), row.text[:row.sent], row.values,
                                              out.finish_reason)
        if any(s is None for s in row.samples):
            return None
        results = sorted(row.samples, key=lambda s: -s.score)[:row.request.num_return_sequences]
        best = results[0]
        return Output(row.uid, best.tokens[-1], best.text, best.finish_reason, out.prompt_tokens, len(best.tokens),
                      sequences=results)

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
