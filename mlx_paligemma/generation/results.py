"""What the engine hands out: an Output per row and step, and one Result per request when it ends.

Every surface (generate, stream_generate, batch_generate, the batch command, the server, score, evaluation) reads
the same Result rather than rebuilding an answer from the stream: its best (or only) answer's text, tokens and
log-probabilities, why it ended, its token counts, and every answer of the request in `sequences` (a beam search's
and best_of's best first, n choices and scored continuations in order).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .beams import BeamSequence


@dataclass
class Result:
    """One request's answer, handed out once, on its last Output."""

    uid: int
    text: str
    tokens: List[int]
    logprobs: List[float]  # each token's log-probability (a beam's where it was chosen)
    top_logprobs: List[List[Tuple[int, float]]]  # with logprobs=k: k alternatives a token, most likely first
    finish_reason: Optional[str]  # "stop" (eos or a stop string), "length", or "error"
    prompt_tokens: int
    generation_tokens: int
    sequences: List[BeamSequence] = field(default_factory=list)  # every answer of the request
    error: Optional[Exception] = None  # the request's own fault (its constraint, sampler or processor), which
    # ended it alone: an InputError naming the field when it came from the request's input


@dataclass
class Output:
    """What one row produced in one step."""

    uid: int
    token: int
    text: str  # the new piece of text (may be empty while a character or a stop string is incomplete)
    finish_reason: Optional[str]  # "stop" (eos or a stop string), "length", "error", or None while running
    prompt_tokens: int
    generation_tokens: int
    logprob: Optional[float] = None  # the token's log-probability, when its request wants them
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # (id, log-probability), most likely first, when asked
    index: int = 0  # which of its request's rows (a choice of n, a forced continuation's position in `forced`)
    answer: Optional[BeamSequence] = None  # on a streamed row's last output: that row's (choice's) whole answer
    result: Optional[Result] = None  # on the request's last output: its answer
    whole: bool = False  # a beam search's or best_of's answers, handed out in this one output

    @property
    def sequences(self) -> Optional[List[BeamSequence]]:
        """A beam search's or best_of's answers (best first) on its one output; None on streamed outputs."""
        return self.result.sequences if self.whole else None


def result_of(uid: int, sequences: List[BeamSequence], prompt_tokens: int, top: BeamSequence) -> Result:
    """The Result of a request whose answers are `sequences`, `top` the one it answers with."""
    return Result(uid, top.text, list(top.tokens), list(top.logprobs), list(top.top_logprobs), top.finish_reason,
                  prompt_tokens, len(top.tokens), sequences)
