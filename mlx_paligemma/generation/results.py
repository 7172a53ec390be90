"""The two records of an answer: an Output per row and step (a piece), and a Result per answer.

Every surface (generate, stream_generate, batch_generate, the batch command, the server, score, evaluation) reads
the same Result rather than rebuilding an answer from the stream: its text, tokens and log-probabilities, why it
ended, its token counts. A request ends with one Result, handed out on its last Output; a request of several
answers (a beam search's and best_of's, best first; n choices and scored continuations, in order) lists each, a
Result too, in `sequences`, and its own fields are its best (or first) one's. The Python API hands out Results too
(`GenerationResult` is its name there): generate's answer, with its objects and speed, and each piece of
stream_generate's. Both are built by keyword.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple


@dataclass(kw_only=True)
class Result:
    """One answer: of a request (handed out once, on its last Output), of one of its sequences, or a piece of a
    stream (then `text` and `tokens` are the new piece's)."""

    text: str = ""
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)  # each token's log-probability (a beam's where chosen)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)  # with logprobs=k: k a token
    finish_reason: Optional[str] = None  # "stop" (eos, a stop string), "length" or "error"; None while running
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # A beam's score: its summed log-probability / len(tokens) ** length_penalty (transformers' sequences_scores);
    # the other answers': the summed log-probability.
    score: float = 0.0
    sequences: Optional[List["Result"]] = None  # a request of several answers: every one of them
    error: Optional[Exception] = None  # the request's own fault (its constraint, sampler, processors, logits),
    # which ended it alone: an InputError naming the field when it came from the request's input
    uid: int = -1  # the engine's request
    index: int = 0  # which of its request's answers (a choice of n) this piece or answer is
    # Filled by the Python API (tasks/ and the timing are above the engine):
    objects: Optional[List[Any]] = None  # detect/segment prompts: boxes (masks), in the image's pixels
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB

    @property
    def token(self) -> Optional[int]:
        return self.tokens[-1] if self.tokens else None

    @property
    def logprob(self) -> Optional[float]:
        return self.logprobs[-1] if self.logprobs else None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generation_tokens

    @property
    def texts(self) -> List[str]:
        """Every answer's text (beams, best_of, n), best (or first) first."""
        return [s.text for s in self.sequences] if self.sequences else [self.text]

    def __str__(self) -> str:
        return self.text


@dataclass(kw_only=True)
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
    answer: Optional[Result] = None  # on a streamed row's last output: that row's (choice's) whole answer
    result: Optional[Result] = None  # on the request's last output: its answer
    whole: bool = False  # a beam search's or best_of's answers, handed out in this one output

    @property
    def sequences(self) -> Optional[List[Result]]:
        """A beam search's or best_of's answers (best first) on its one output; None on streamed outputs."""
        return self.result.sequences if self.whole else None


def result_of(uid: int, sequences: List[Result], prompt_tokens: int, top: Result) -> Result:
    """The Result of a request whose answers are `sequences`, `top` the one it answers with."""
    return Result(uid=uid, text=top.text, tokens=list(top.tokens), logprobs=list(top.logprobs),
                  top_logprobs=list(top.top_logprobs), finish_reason=top.finish_reason, prompt_tokens=prompt_tokens,
                  generation_tokens=len(top.tokens), score=top.score, sequences=sequences)
