"""The generation engine: every prompt is a row of one batch that shares each decode step.

The engine schedules work, not requests. One step is one decode step of the running rows plus at most
`prefill_budget` seconds of other work: pieces of the prefills under way (prefill.py: one image's encoding, one
block of a layer's tokens), taken in turn. So a long prompt arriving holds the running rows up for one budget a step,
never for its whole prefill, and a short prompt arriving beside it is not queued behind it. A request alone runs its
prefill piece after piece, with nothing between them but its owner's look at what arrived or was cancelled. A row's
prefix goes through the decoder whole, on its own, so its bidirectional attention is exact; rows that arrive
together are prefilled together, left-padded. When its prefill is done a row joins the running rows' KV buffers
(kv_buffers.py, the one cache from prefill to decode) and from there on a compiled step feeds one token per row.
Rows leave when they finish (eos, a stop string, their max_tokens, the context) or are cancelled, and waiting
prompts join as others leave: continuous batching. One prompt is simply a batch of one.

A request (request.py) is one row, or several sharing one prefill of their prompt, decoded by the strategy of its
kind (strategies.py: sampled or greedy rows and n choices, best_of, beams, forced rows for scoring), and ends with
one Result (results.py) on its last Output: every accepted request ends, within its max_tokens steps. A row may
carry a constraint (structured output), a token mask applied before any picking; constrained and free rows share
steps. What a request's own parts raise (its constraint, sampler, processors) or produce (logits that are not
finite) ends that request alone, with the error in its Result. Below the engine: prefill.py, picking.py (each
row's token from a step's logits), constraints.py (the masks), sampling.py (samplers, log-probabilities), beams.py
(transformers' beam bookkeeping), kv_buffers.py (the KV buffers and the compiled step), detokenizer.py, features.py
(the image-feature cache).

    engine = Engine(model, processor, batch_size=8)
    uid = engine.submit(images=img, prompt="caption en", max_tokens=50)
    with engine.running():
        while engine.has_work:
            for out in engine.step():   # Output(uid=, token=, text=, finish_reason=, logprob=, ..., result=)
                ...
"""

import itertools
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, List, Optional

import mlx.core as mx
import numpy as np

from .. import limits
from .adapters import adapter_ids, check_adapter
from .constraints import make_constraint
from ..processing.detokenizer import Detokenizer, byte_ids
from .features import FeatureCache, feature_cache
from .kv_buffers import KVBuffers, decode_step
from ..models.paligemma import PaliGemma
from ..processing.answer_format import has_objects
from ..errors import InputError
from ..processing.processor import PaliGemmaProcessor
from .prefill import Prefill
from .request import Request
from .settings import Settings, check_settings
from .results import Output, Result
from .sampling import Picked
from .picking import not_finite, pick
from .strategies import Row, Vocabulary, strategy_for

__all__ = ["Engine", "Request", "Output", "Result", "Detokenizer", "byte_ids", "FeatureCache", "feature_cache"]

CLEAR_CACHE_EVERY = 256  # decode steps between returning MLX's buffer cache to the system
# Prompt tokens prefilled together at most (one prompt longer than this still goes alone): the activations of a
# prefill grow with it, and a batch of 448 or 896 px prompts prefilled at once would add gigabytes to the peak.
PREFILL_TOKENS = 2048
# Seconds of prefill work an engine step does beside its running rows' decode step (at least one piece): the most a
# running row waits between two tokens, beyond its own step, whatever arrives. Chosen by measurement (docs/SPEED.md).
PREFILL_BUDGET = 0.1


def check_prefill_budget(seconds) -> float:
    """The budget, a number of seconds in [0, 60] (the engine's and the server's --prefill-budget check)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 60:
        raise InputError(f"prefill_budget must be a number of seconds in [0, 60], got {seconds!r}",
                         param="prefill_budget")
    return seconds


def check_size(request: Request, context: int) -> None:
    """A request of several rows (n, best_of, num_beams) holds rows x (its prompt and answer, within the context)
    positions of keys and values, and each of its decode steps attends over them all: beyond limits.py's
    max_request_tokens it is refused before it is queued, naming the setting that multiplies it. (Scoring's forced
    rows are the caller's own batches.)"""
    name = next((name for name in ("num_beams", "best_of", "n") if getattr(request.settings, name) > 1), None)
    if name is None or request.forced:
        return
    rows, prompt = getattr(request.settings, name), len(request.prompt_ids)
    positions = min(prompt + request.settings.max_tokens, context)
    limit = limits.LIMITS.max_request_tokens
    if rows * positions > limit:
        raise InputError(f"{name}={rows} rows of {positions} tokens (a prompt of {prompt}, up to {positions - prompt} "
                         f"new) make {rows * positions} tokens, more than the limit of {limit}: ask for fewer rows, "
                         "fewer max_tokens or a shorter prompt", param=name)


class Batch:
    """The running rows, their keys and values, and the token each has picked and not yet handed out."""

    def __init__(self, rows: List[Row], kv: KVBuffers, picked: Optional[Picked] = None):
        self.rows, self.kv, self.picked = rows, kv, picked

    @property
    def length(self) -> int:
        return self.kv.length

    def keep(self, indices: List[int]) -> None:
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return  # the owner drops an empty batch
        index = mx.array(indices, dtype=mx.int32)
        self.kv.take(indices, index)
        if self.picked is not None:
            self.picked = self.picked.take(index)

    def extend(self, other: "Batch") -> None:
        self.kv.extend(other.kv)
        self.rows += other.rows
        self.picked = self.picked.concat(other.picked)


class Engine:
    """Rows of many requests in one batch. `submit` queues a request and returns its uid; `step` runs one
    decode step for the whole batch (admitting waiting requests first) and returns what each row produced."""

    def __init__(self, model: PaliGemma, processor: Optional[PaliGemmaProcessor] = None, batch_size: int = 8,
                 kv_bits: Optional[int] = None, prefill_tokens: int = PREFILL_TOKENS, deterministic: bool = False,
                 prefill_budget: float = PREFILL_BUDGET):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.processor, self.batch_size, self.prefill_tokens = model, processor, batch_size, prefill_tokens
        self.kv_bits, self.kv_group_size = kv_bits, self._kv_group_size(model, kv_bits)
        self.vocab = Vocabulary(  # what the strategies know of the model
            eos_id=processor.tokenizer.eos_id if processor is not None else model.config.eos_token_id,
            context=model.config.text_config.max_position_embeddings,  # a row ends ("length") when it is full
            processor=processor, byte_ids=byte_ids(processor) if processor is not None else frozenset())
        self.pad_id = processor.tokenizer.pad_id if processor is not None else 0
        self.features = feature_cache(model)
        # deterministic: every request in batches of its own (its own prefill, keys and values, decode step and
        # image features, computed image by image), so its tokens and log-probabilities are bitwise what it gets
        # alone, whatever runs beside it. Float rounding otherwise follows the batch's shape (matmul blocking,
        # the reductions' split over padded lengths).
        self.deterministic = deterministic
        self.prefill_budget = check_prefill_budget(prefill_budget)
        self.waiting: List[Row] = []
        self.prefills: List[Prefill] = []  # under way, each advanced a piece at a time in turn
        self.batches: List[Batch] = []  # one, or one per request when deterministic
        self.next_uid = 0
        self.steps = 0
        self.turn = 0  # prefill pieces done: whose turn the next one is

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

    def submit(self, images=None, prompt: str = "", settings: Optional[Settings] = None, **given) -> int:
        """Queue a prompt about one or more images (PIL images, paths or URLs; a list for several). The images are
        read and the prompt checked now, so a bad request fails here with one InputError line. `settings` (checked
        by check_settings) or the keywords themselves say how to answer; at most one of response_format (OpenAI's),
        json_schema, regex, choices or constrain=True (the detect/segment grammar) keeps the answer inside it (see
        constraints.make_constraint; or `constraint=`, one already made); a bad one fails here too. `forced`,
        `stop_at_eos` and `sampler` go to the Request as they are."""
        if self.processor is None:
            raise InputError("this engine has no processor: submit token ids with add()")
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}", param="prompt")
        more = {k: given.pop(k) for k in ("forced", "stop_at_eos", "sampler") if k in given}
        compiled = given.pop("constraint", None)  # made by the caller (the server, off this thread), or here
        settings = settings if settings is not None else check_settings("submit()", **given)
        if settings.logprobs is None and has_objects(prompt):  # an object's score is its tokens' probability
            settings = replace(settings, logprobs=0)
        constraint = compiled if compiled is not None else make_constraint(
            self.processor, self.model.config.text_config.vocab_size, prompt, **settings.constraint())
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = self.processor(images=[images], text=prompt)
        pixels = np.array(inputs["pixel_values"]) if len(images) else None
        return self.add(Request(np.array(inputs["input_ids"])[0].tolist(), pixels, settings=settings,
                                constraint=constraint, **more))

    def add(self, request: Request) -> int:
        """Queue a request already in token ids. Its rows (beams, samples, choices, forced continuations) come and go
        together and share one prefill."""
        check_adapter(self.model, request.settings.adapter)
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        vocab = self.model.config.text_config.vocab_size
        if request.forced and not all(0 <= t < vocab for f in request.forced for t in f):
            raise InputError(f"forced tokens must be token ids in [0, {vocab})", param="forced")
        if request.forced and max(map(len, request.forced)) > self.vocab.context - len(request.prompt_ids):
            raise InputError(f"a continuation of {max(map(len, request.forced))} tokens after a prompt of "
                             f"{len(request.prompt_ids)} runs past the model's context of {self.vocab.context}",
                             param="forced")
        bias = request.settings.logit_bias
        if bias and not all(isinstance(t, int) and 0 <= t < vocab for t in bias):
            raise InputError(f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        check_size(request, self.vocab.context)
        self.waiting += strategy_for(self.vocab, uid, request).rows
        return uid

    def cancel(self, uid: int) -> None:
        """Stop a request; its rows leave at the next step (a client that went away frees its rows). A prefill
        whose requests are all cancelled is given up at once."""
        self.waiting = [r for r in self.waiting if r.uid != uid]
        for r in self.rows():
            if r.uid == uid:
                r.cancelled = True
        self.prefills = [p for p in self.prefills if not all(r.cancelled for r in p.rows)]

    def rows(self) -> Iterator[Row]:
        """Every row the engine holds: waiting, being prefilled, running."""
        yield from self.waiting
        for part in (self.prefills, self.batches):
            for p in part:
                yield from p.rows

    @property
    def batch(self) -> Optional[Batch]:
        """The running batch (the first of them when deterministic), None when no row runs."""
        return self.batches[0] if self.batches else None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefills or self.batches)

    @property
    def active(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    @property
    def prefilling(self) -> int:
        """Requests whose prefill is under way."""
        return sum(len(p.firsts) for p in self.prefills)

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
        """One decode step of the running rows, and beside it at most `prefill_budget` seconds of prefill work (at
        least one piece), so whatever arrives, a running row waits no longer than that between two tokens."""
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            for batch in self.batches:
                batch.keep([i for i, r in enumerate(batch.rows) if not r.cancelled])
            self.batches = [b for b in self.batches if b.rows]
            self._admit()
            started = []
            for batch in self.batches:
                pending, rows = batch.picked, batch.rows
                # Rows whose pending token is their last leave before the next step is built, so no step is wasted.
                batch.keep([i for i, r in enumerate(rows) if r.strategy.room(r) > 1])
                if batch.rows:
                    batch.picked = self._decode(batch)
                    # computed while this step's tokens are handed out
                    mx.async_eval(batch.picked.tokens,
                                  *[a for a in [batch.picked.logprobs, batch.picked.finite] if a is not None])
                started.append((batch, rows, pending))
            outputs = []
            for batch, rows, pending in started:
                outputs += self._hand_out_all(rows, pending)
                batch.keep([i for i, r in enumerate(batch.rows) if not r.finished])
            self.batches = [b for b in self.batches if b.rows]
            self._prefill_work()
            self.steps += 1
            if not self.has_work or self.steps % CLEAR_CACHE_EVERY == 0:
                mx.clear_cache()
        return outputs

    def _admit(self) -> None:
        """Finished prefills join the running rows; waiting rows start a prefill while there is room."""
        for p in [p for p in self.prefills if p.done]:
            self.prefills.remove(p)
            batch = Batch(p.rows, p.kv)
            # Every beam starts from the same prefix: no keys and values to move after the first step.
            batch.picked, _ = pick(p.rows, p.logits, self.vocab.eos_id)
            if self.batches and not self.deterministic:
                self.batches[0].extend(batch)
            else:
                self.batches.append(batch)
            mx.clear_cache()  # the prefix's temporaries (a 4096-token prefix at 896 px) do not stay in MLX's cache
        if not self.waiting:
            return
        room = self.batch_size - self.active - sum(len(p.rows) for p in self.prefills)
        if room <= 0:
            return
        # One group a step, within the prefill budget of tokens. A request's rows (beams, forced continuations)
        # join whole, and are prefilled once; one larger than the batch goes alone.
        rows, tokens = [], 0
        for _, group in itertools.groupby(self.waiting, key=lambda r: id(r.strategy)):
            group = list(group)
            tokens += len(group[0].request.prompt_ids)
            alone = not rows and not self.batches and not self.prefills
            if rows and (tokens > self.prefill_tokens or self.deterministic) or (
                    len(rows) + len(group) > room and not alone):
                break
            rows += group
        if rows:
            self.waiting = self.waiting[len(rows):]
            self.prefills.append(Prefill(self.model, rows, self.features, self.pad_id, self.kv_bits,
                                         self.kv_group_size))

    def _prefill_work(self) -> None:
        """Pieces of the prefills under way, in turn (the turn goes on from step to step, so a prompt arriving beside
        a long prefill gets every other piece), until the budget is spent or all are done."""
        if not self.prefills:
            return
        deadline = time.monotonic() + self.prefill_budget
        while True:
            todo = [p for p in self.prefills if not p.done]
            if not todo:
                return
            todo[self.turn % len(todo)].advance()
            self.turn += 1
            if time.monotonic() >= deadline:
                return

    def _decode(self, batch: Batch) -> Picked:
        kv = batch.kv
        kv.reserve()
        step = decode_step(self.model, self.kv_bits, self.kv_group_size)
        logits, kv.keys, kv.values = step(batch.picked.tokens, mx.array(kv.length), mx.array(kv.left_padding),
                                          kv.keys, kv.values, adapter_ids(self.model, batch.rows))
        kv.length += 1
        picked, parents = pick(batch.rows, logits, self.vocab.eos_id)
        if parents != list(range(len(batch.rows))):
            kv.copy_rows(parents)  # beams continue other beams: their keys and values come along
        return picked

    def _hand_out_all(self, rows: List[Row], picked: Picked) -> List[Output]:
        tokens = picked.tokens.tolist()
        logprobs = picked.logprobs.tolist() if picked.logprobs is not None else [None] * len(tokens)
        top = (picked.top_ids.tolist(), picked.top_values.tolist()) if picked.top_ids is not None else None
        finite = picked.finite.tolist() if picked.finite is not None else [True] * len(tokens)
        outputs = []
        for i, row in enumerate(rows):
            strategy = row.strategy
            out = None
            if not finite[i]:
                strategy.fail(not_finite(row))
            if strategy.error is None:
                try:
                    out = strategy.hand_out(row, tokens[i], logprobs[i], (top[0][i], top[1][i]) if top else None)
                except Exception as e:  # its stop strings, its detokenizer: the request's own
                    strategy.fail(e)
                if not row.finished and strategy.room(row) <= 0:
                    # Out of room and not ended: never left without an answer (the engine's promise).
                    strategy.fail(RuntimeError("the request ran out of tokens without an answer"))
            if strategy.error is not None:
                out = strategy.failed(row)
            if out is not None:
                outputs.append(out)
        return outputs
