"""What one request asks of the engine, and the one check of generation settings every surface uses.

A Request holds the unpadded prefix ids (or images to encode), the decoding settings (greedy, sampled, beams,
best_of, forced continuations for scoring), and an optional constraint. `check_generation_args` checks every
setting and their combinations before any work: the API, the command lines (before a model loads) and the server
(before a request is queued) all call it, so one bad value is one line, worded the same everywhere.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .. import defaults
from .constraints import Constraint
from ..errors import InputError

MAX_LOGPROBS = 20  # alternatives a token may carry, as OpenAI's top_logprobs
MAX_BEST_OF = 64  # samples of one best_of request: rows of the batch, so its cost is bounded before it starts


@dataclass
class Request:
    """One prompt and how to answer it. `prompt_ids` is the unpadded prefix; `pixel_values` (N, H, W, 3) its
    images, or `image_features` (N, T, D) when already computed."""

    prompt_ids: List[int]
    pixel_values: Optional[np.ndarray] = None
    image_features: Optional[mx.array] = None
    max_tokens: int = defaults.MAX_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    top_k: int = defaults.TOP_K
    min_p: float = defaults.MIN_P
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = defaults.REPETITION_CONTEXT_SIZE
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    sampler: Optional[Callable[[mx.array], mx.array]] = None  # replaces temperature/top_p/top_k/min_p
    logprobs: int = defaults.LOGPROBS  # top alternatives handed out with each token
    num_beams: int = defaults.NUM_BEAMS
    length_penalty: float = defaults.LENGTH_PENALTY
    early_stopping: Union[bool, str] = defaults.EARLY_STOPPING  # True, False or "never", as transformers
    num_return_sequences: int = 1
    # big_vision's best_of_n: sample this many answers (rows sharing one prefill, row i seeded seed + i) and return
    # the likeliest (summed log-probability, <eos> included) first, as a beam search returns its sequences.
    best_of: int = defaults.BEST_OF
    # Given continuations, one row each (scoring): their tokens are fed, not chosen, and their log-probabilities
    # handed out. They share the prefix's keys and values.
    forced: Optional[List[List[int]]] = None
    # Structured output (constraints.py): every row's tokens kept inside its grammar; Engine.submit builds it from
    # response_format= / json_schema= / regex= / choices= / constrain=.
    constraint: Optional[Constraint] = None
    # The LoRA adapter its rows run through, by the name it was loaded under (load(..., adapters=)); None: the base.
    adapter: Optional[str] = None

    def __post_init__(self):
        check_generation_args(self.max_tokens, self.temperature, self.top_p, self.top_k, self.min_p,
                              self.repetition_penalty, self.repetition_context_size, self.seed, self.logprobs,
                              self.num_beams, self.length_penalty, self.early_stopping, self.num_return_sequences,
                              self.best_of)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InputError("stop must be a list of non-empty strings")
        if self.num_beams > 1:
            # transformers' beam sampling and its processors are not reproduced: refused rather than ignored.
            if self.temperature > 0 or self.sampler is not None:
                raise InputError("num_beams > 1 decodes deterministically: leave temperature at 0")
            if self.repetition_penalty is not None or self.logit_bias or self.stop:
                raise InputError("num_beams > 1 takes no repetition_penalty, logit_bias or stop strings")
        if self.forced is not None and not (
                self.forced and all(isinstance(f, list) and f and all(isinstance(t, int) for t in f)
                                    for f in self.forced)):
            raise InputError("forced must be a non-empty list of non-empty token id lists")
        if self.best_of > 1 and (self.temperature == 0 and self.sampler is None):
            raise InputError("best_of > 1 keeps the likeliest of several samples: give a temperature > 0")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise InputError(f"adapter must be an adapter's name or None (the base), got {type(self.adapter).__name__}")
        if self.forced is not None and self.constraint is not None:
            raise InputError("forced continuations are scored as given: they take no constraint")


def check_generation_args(max_tokens=defaults.MAX_TOKENS, temperature=defaults.TEMPERATURE, top_p=defaults.TOP_P,
                          top_k=defaults.TOP_K, min_p=defaults.MIN_P, repetition_penalty=None,
                          repetition_context_size=defaults.REPETITION_CONTEXT_SIZE, seed=None,
                          logprobs=defaults.LOGPROBS, num_beams=defaults.NUM_BEAMS,
                          length_penalty=defaults.LENGTH_PENALTY, early_stopping=defaults.EARLY_STOPPING,
                          num_return_sequences=1, best_of=defaults.BEST_OF) -> None:
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
    integer("logprobs", logprobs, 0)
    if logprobs > MAX_LOGPROBS:
        raise InputError(f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}")
    integer("num_beams", num_beams, 1)
    number("length_penalty", length_penalty)
    if early_stopping not in (True, False, "never"):
        raise InputError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    integer("best_of", best_of, 1)
    if best_of > MAX_BEST_OF:
        raise InputError(f"best_of must be at most {MAX_BEST_OF}, got {best_of}")
    if num_beams > 1 and best_of > 1:
        raise InputError("num_beams and best_of are two ways of choosing among answers: give one, not both")
    for name, n in (("num_beams", num_beams), ("best_of", best_of)):
        if n > 1 and logprobs:
            raise InputError(f"logprobs={logprobs} with {name} > 1: the answers' tokens carry their own "
                             "log-probabilities but no alternatives; leave logprobs (top alternatives) at 0")
    integer("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > max(num_beams, best_of):
        raise InputError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({num_beams}) "
                         f"or best_of ({best_of})")
