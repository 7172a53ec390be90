"""One strategy per kind of decoding: a request's rows, how they pick their tokens, when they end, what they hand
out, and the one Result (results.py) the request ends with.

- Sampled: one row, or n choices (row i seeded seed + i, so choice i is what seed + i answers alone), greedy or
  sampled, with the request's processors (repetition penalty, logit bias); each row hands out its tokens as they
  come.
- BestOf: best_of sampled rows that hand out nothing until the last ends, then the likeliest first (big_vision's
  best_of_n: the summed log-probability, <eos> included; the first of equal scores wins, as its argmax).
- Beams: num_beams rows under transformers' bookkeeping (beams.py); a token comes with the beam it continues.
- Forced: one row per given continuation (scoring): its tokens are fed, not chosen.

All of a request's rows share one prefill of its prompt (the engine copies its keys and values). The engine asks a
strategy `greedy` (may the batch's one argmax pick for it), `pick` (its rows' tokens), `room(row)` and
`hand_out`; a strategy knows the model only by its Vocabulary (eos, context, processor) and never calls the
engine. Whatever a request's own parts raise (its constraint, sampler, processors) is its `fail`: the request ends
alone, with the error in its Result, and the batch goes on.
"""

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import mlx.core as mx

from ..errors import InputError, cause
from ..processing.detokenizer import Detokenizer
from .beams import BeamGroup
from .constraints import Constraint
from .request import Request
from .results import Output, Result, result_of
from .sampling import log_softmax, sample

Top = Optional[Tuple[List[int], List[float]]]  # a row's top alternatives this step (the batch's widest k)


def own(constraint: Optional[Constraint]) -> Optional[Constraint]:
    """A row's own copy of its request's constraint (the request's stays at the start, for every row)."""
    return None if constraint is None else constraint.copy()


def fresh_seed() -> int:
    return int(mx.random.randint(0, 2**31 - 1, ()).item())


@dataclass(eq=False)
class Row:
    uid: int
    request: Request
    strategy: "Strategy"
    index: int = 0  # which of its request's rows
    detokenizer: Optional[Detokenizer] = None
    key: Optional[mx.array] = None  # its own random stream, so a seeded row samples the same in any batch
    processors: List[Any] = field(default_factory=list)
    history: Optional[mx.array] = None  # prompt and answer ids, for the repetition penalty
    constraint: Optional[Constraint] = None  # the row's own grammar state (a beam's follows its parent's)
    generated: int = 0  # tokens handed out
    picked: int = 0  # tokens chosen (one ahead of those handed out while a step is under way)
    text: str = ""  # answer text so far, of which `sent` characters were handed out
    sent: int = 0
    cancelled: bool = False
    finished: bool = False  # the row leaves the batch
    finish_reason: Optional[str] = None
    tokens: List[int] = field(default_factory=list)  # what it handed out, for its request's Result
    values: List[float] = field(default_factory=list)
    tops: List[List[Tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class Vocabulary:
    """What a strategy knows of the model it decodes for (the engine gives it; a strategy never calls the engine)."""

    eos_id: int
    context: int  # positions a row may fill, prompt and answer
    processor: Any = None  # the detokenizer's decode and beams' text; None for token ids only
    byte_ids: frozenset = frozenset()  # byte-fallback pieces, which the detokenizer joins before decoding


class Strategy:
    """A request's rows and how they decode, for a model described by `vocab`."""

    forgiving = False  # a row may be handed a token its grammar forbids (beams: a -inf candidate that never wins)
    greedy = False  # its rows may be picked by the batch's one argmax

    def __init__(self, vocab: Vocabulary, uid: int, request: Request):
        self.vocab, self.uid, self.request = vocab, uid, request
        self.rows: List[Row] = []
        self.error: Optional[Exception] = None
        self.ended = False  # its Result was handed out
        # Tokens the request may make: its max_tokens, within the model's context.
        self.limit = min(request.settings.max_tokens, vocab.context - len(request.prompt_ids))

    @property
    def wants_logprobs(self) -> bool:
        """Its tokens' log-probabilities were asked for (logprobs=0 or more), or come with how it picks (sampled,
        beams, forced rows): a greedy row nobody asked them of skips them."""
        return self.request.settings.logprobs is not None or not self.greedy

    def pick(self, members: List[Tuple[int, Row]], logits: mx.array, logprobs: mx.array, tokens: list,
             parents: List[int]) -> None:
        """Sets tokens[i] (a (1,) array) and, for beams, parents[i] of each of its rows (i, row) in the batch."""
        raise NotImplementedError

    def room(self, row: Row) -> int:
        raise NotImplementedError

    def blame(self) -> Optional[str]:
        """The setting a failure of `pick` is about."""
        return None

    def hand_out(self, row: Row, token: int, logprob: float, top: Top) -> Optional[Output]:
        raise NotImplementedError

    def fail(self, error: Exception, what: Optional[str] = None) -> None:
        """The request's own fault ends it (the first one counts): an InputError naming its field."""
        if self.error is None:
            self.error = error if isinstance(error, InputError) else InputError(
                f"{what or 'the request'} failed while decoding: {cause(error)}"[:500], param=what)

    def failed(self, row: Row) -> Optional[Output]:
        """A failed request's one output: its error; every row of it ends."""
        for r in self.rows:
            r.finished = True
        if self.ended:
            return None
        self.ended = True
        prompt = len(self.request.prompt_ids)
        result = Result(uid=self.uid, finish_reason="error", prompt_tokens=prompt, sequences=[], error=self.error)
        return Output(uid=self.uid, token=self.vocab.eos_id, text="", finish_reason="error", prompt_tokens=prompt,
                      generation_tokens=row.generated, index=row.index, result=result)

    def _end(self, row: Row, reason: str) -> bool:
        """Ends a row; True when it was the request's last."""
        row.finished, row.finish_reason = True, reason
        if all(r.finished for r in self.rows) and not self.ended:
            self.ended = True
            return True
        return False


class Sampled(Strategy):
    """Greedy or sampled rows: one, or `count` choices seeded seed + i, each handing out its tokens."""

    def __init__(self, vocab: Vocabulary, uid: int, request: Request, count: int = 1):
        super().__init__(vocab, uid, request)
        seed = request.settings.seed
        if count > 1 and seed is None:
            seed = fresh_seed()
        self.rows = [self._row(i, seed + i if count > 1 else seed) for i in range(count)]
        self.greedy = request.sampler is None and request.settings.temperature == 0 and not self.rows[0].processors

    def _row(self, index: int, seed: Optional[int]) -> Row:
        request, vocab = self.request, self.vocab
        row = Row(self.uid, request, self, index, constraint=own(request.constraint))
        if vocab.processor is not None:
            row.detokenizer = Detokenizer(vocab.processor.tokenizer.decode, vocab.byte_ids)
        if request.sampler is None and request.settings.temperature > 0:
            row.key = mx.random.key(seed if seed is not None else fresh_seed())
        if request.settings.repetition_penalty is not None or request.settings.logit_bias:
            from mlx_lm.sample_utils import make_logits_processors

            row.processors = make_logits_processors(request.settings.logit_bias, request.settings.repetition_penalty,
                                                    request.settings.repetition_context_size)
            row.history = mx.array(request.prompt_ids[-request.settings.repetition_context_size:])
        return row

    def pick(self, members, logits, logprobs, tokens, parents) -> None:
        for i, row in members:
            tokens[i] = self._sample_row(row, logits[i : i + 1])

    def blame(self) -> Optional[str]:
        request = self.request
        if request.sampler is not None:
            return "sampler"
        if self.rows[0].processors:
            return "logit_bias" if request.settings.logit_bias else "repetition_penalty"
        return None

    def _sample_row(self, row: Row, logits: mx.array) -> mx.array:
        request = self.request
        for processor in row.processors:
            logits = processor(row.history, logits)
        logprobs = log_softmax(logits)
        if request.sampler is not None:
            token = request.sampler(logprobs)
        else:
            s = request.settings
            token, row.key = sample(logprobs, s.temperature, row.key, s.top_p, s.min_p, s.top_k)
        if row.processors:
            # The penalty looks at the last repetition_context_size tokens only: keep no more.
            row.history = mx.concatenate([row.history, token])[-request.settings.repetition_context_size:]
        return token

    def room(self, row: Row) -> int:
        return 0 if self.error is not None else self.limit - row.generated

    def hand_out(self, row: Row, token: int, logprob: float, top: Top) -> Optional[Output]:
        out = self._take(row, token, logprob, top)
        if out.finish_reason:
            last = self._end(row, out.finish_reason)
            out.answer = self.sequence(row)
            if last:
                sequences = [self.sequence(r) for r in self.rows]
                out.result = result_of(self.uid, sequences, len(self.request.prompt_ids), sequences[0])
        return out

    def sequence(self, row: Row) -> Result:
        return Result(uid=self.uid, index=row.index, text=row.text[:row.sent], tokens=row.tokens, logprobs=row.values,
                      top_logprobs=row.tops, finish_reason=row.finish_reason, score=math.fsum(row.values),
                      prompt_tokens=len(self.request.prompt_ids), generation_tokens=len(row.tokens))

    def _take(self, row: Row, token: int, logprob: float, top: Top) -> Output:
        request = self.request
        row.generated += 1
        row.tokens.append(token)
        row.values += [logprob] if self.wants_logprobs else []
        finish = None
        if token == self.vocab.eos_id and request.stop_at_eos:
            finish = "stop"
        elif self.room(row) <= 0:
            finish = "length"
        piece = ""
        if row.detokenizer is not None:
            if token != self.vocab.eos_id:
                row.text += row.detokenizer.add(token)
            if finish:
                row.text += row.detokenizer.flush()
            piece, stopped = release(row, final=finish is not None)
            if stopped:
                finish = "stop"
        out = Output(uid=self.uid, token=token, text=piece, finish_reason=finish, prompt_tokens=len(request.prompt_ids),
                     generation_tokens=row.generated, logprob=logprob if self.wants_logprobs else None,
                     index=row.index)
        if request.settings.logprobs:
            out.top_logprobs = list(zip(top[0][:request.settings.logprobs], top[1][:request.settings.logprobs]))
            row.tops.append(out.top_logprobs)
        return out


class BestOf(Sampled):
    """best_of sampled rows (seeds seed + i) that hand out their answers, likeliest first, when the last ends."""

    def hand_out(self, row: Row, token: int, logprob: float, top: Top) -> Optional[Output]:
        out = self._take(row, token, logprob, top)
        if not out.finish_reason or not self._end(row, out.finish_reason):
            return None
        ranked = sorted((self.sequence(r) for r in self.rows), key=lambda s: -s.score)
        sequences = ranked[:self.request.settings.num_return_sequences]
        best = sequences[0]
        result = result_of(self.uid, sequences, out.prompt_tokens, best)
        return Output(uid=self.uid, token=best.tokens[-1], text=best.text, finish_reason=best.finish_reason,
                      prompt_tokens=out.prompt_tokens, generation_tokens=len(best.tokens), result=result, whole=True)


class Beams(Strategy):
    """A beam search: num_beams rows, handing out the best num_return_sequences once the search ends."""

    forgiving = True

    def __init__(self, vocab: Vocabulary, uid: int, request: Request):
        super().__init__(vocab, uid, request)
        s = request.settings
        self.group = BeamGroup(s.num_beams, s.length_penalty, s.early_stopping, vocab.eos_id, self.limit)
        self.rows = [Row(uid, request, self, i, constraint=own(request.constraint)) for i in range(s.num_beams)]

    def pick(self, members, logits, logprobs, tokens, parents) -> None:
        group = [i for i, _ in members]
        chosen, within = self.group.step(logprobs[mx.array(group)])
        for j, t, p in zip(group, chosen, within):
            tokens[j], parents[j] = mx.array([t]), group[p]

    def room(self, row: Row) -> int:
        return 0 if self.group.done or self.error is not None else self.limit

    def hand_out(self, row: Row, token: int, logprob: float, top: Top) -> Optional[Output]:
        if not self.group.done or self.ended:
            return None
        self.ended = True
        for r in self.rows:
            r.finished = True
        eos, processor = self.vocab.eos_id, self.vocab.processor
        sequences = self.group.results(self.request.settings.num_return_sequences)
        best, prompt = sequences[0], len(self.request.prompt_ids)
        for i, s in enumerate(sequences):
            if processor is not None:
                s.text = processor.tokenizer.decode([t for t in s.tokens if t != eos])
            s.finish_reason = "stop" if s.tokens[-1] == eos else "length"
            s.uid, s.index, s.prompt_tokens, s.generation_tokens = self.uid, i, prompt, len(s.tokens)
        return Output(uid=self.uid, token=best.tokens[-1], text=best.text, finish_reason=best.finish_reason,
                      prompt_tokens=prompt, generation_tokens=len(best.tokens),
                      result=result_of(self.uid, sequences, prompt, best), whole=True)


class Forced(Strategy):
    """Given continuations (scoring), one row each: their tokens are fed and their log-probabilities handed out."""

    def __init__(self, vocab: Vocabulary, uid: int, request: Request):
        super().__init__(vocab, uid, request)
        self.rows = [Row(uid, request, self, i) for i in range(len(request.forced))]

    def pick(self, members, logits, logprobs, tokens, parents) -> None:
        for i, row in members:
            given = self.request.forced[row.index]
            tokens[i] = mx.array([given[min(row.picked, len(given) - 1)]])

    def room(self, row: Row) -> int:
        return 0 if self.error is not None else len(self.request.forced[row.index]) - row.generated

    def hand_out(self, row: Row, token: int, logprob: float, top: Top) -> Optional[Output]:
        row.generated += 1
        row.tokens.append(token)
        row.values.append(logprob)
        finish = None
        if token == self.vocab.eos_id and self.request.stop_at_eos:
            finish = "stop"
        elif self.room(row) <= 0:
            finish = "length"
        prompt = len(self.request.prompt_ids)
        out = Output(uid=self.uid, token=token, text="", finish_reason=finish, prompt_tokens=prompt,
                     generation_tokens=row.generated, logprob=logprob, index=row.index)
        if finish and self._end(row, finish):
            sequences = [Result(uid=self.uid, index=r.index, tokens=r.tokens, logprobs=r.values,
                                score=math.fsum(r.values), finish_reason=r.finish_reason, prompt_tokens=prompt,
                                generation_tokens=len(r.tokens)) for r in self.rows]
            out.result = result_of(self.uid, sequences, prompt, sequences[0])
        return out


def strategy_for(vocab: Vocabulary, uid: int, request: Request) -> Strategy:
    if request.settings.num_beams > 1:
        return Beams(vocab, uid, request)
    if request.forced:
        return Forced(vocab, uid, request)
    if request.settings.best_of > 1:
        return BestOf(vocab, uid, request, request.settings.best_of)
    return Sampled(vocab, uid, request, request.settings.n)


def release(row: Row, final: bool) -> Tuple[str, bool]:
    """The text that can be handed out now: up to a stop string (which ends the row and is not shown), and short of
    a tail that could still become one."""
    stops = row.request.settings.stop
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
