"""Scoring candidate answers: the log-probability of each candidate given the image(s) and the prompt.

PaliGemma as a zero-shot classifier or ranker (`answer en is there a dog?` -> "yes" / "no", or which of N
captions), as big_vision's `decode_with_logp` / `logits` predict functions. The candidates are rows of the engine
that share the prompt's prefill and whose tokens are fed rather than chosen (Request.forced); each row hands out
the log-probability of its token at each step, the same values generation reports.

    scores = mp.score(model, processor, images="cat.jpg", prompt="answer en is there a cat?", candidates=["yes", "no"])
"""

import math
from functools import partial
from typing import List, Optional, Sequence

from .. import defaults
from .engine import Engine
from .runs import run_all
from ..errors import InputError
from .settings import keywords_checked

MAX_CANDIDATES = 1024  # candidates one call may score: the work is bounded before it starts


def candidate_tokens(processor, candidate: str, include_eos: bool = True) -> List[int]:
    """A candidate's tokens as the processor tokenizes a suffix (the candidate, then <eos>)."""
    tokens = processor.tokenizer.encode(candidate + "<eos>")
    return tokens if include_eos else tokens[:-1]


def candidate_logprobs(model, processor, images=None, prompt: str = "", candidates: Sequence[str] = (),
                   include_eos: bool = True, batch_size: int = defaults.BATCH_SIZE,
                   kv_bits: Optional[int] = None, adapter: Optional[str] = None) -> List[List[float]]:
    """Per candidate, the log-probability of each of its tokens (and <eos>, unless include_eos=False); `adapter`:
    the loaded adapter to score through (None: the base)."""
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) or not candidates:
        raise InputError("candidates must be a non-empty list of strings")
    if not all(isinstance(c, str) for c in candidates):
        raise InputError("candidates must be strings")
    if len(candidates) > MAX_CANDIDATES:
        raise InputError(f"at most {MAX_CANDIDATES} candidates a call, got {len(candidates)}")
    tokens = [candidate_tokens(processor, c, include_eos) for c in candidates]
    if not all(tokens):
        raise InputError("an empty candidate without <eos> has no tokens to score")
    engine = Engine(model, processor, batch_size=batch_size, kv_bits=kv_bits)
    # Each group of batch_size candidates is one request: one prefill, its keys and values copied to the rows.
    chunks = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
    submits = [(i, partial(engine.submit, images, prompt, forced=chunk, max_tokens=max(map(len, chunk)),
                           stop_at_eos=False, adapter=adapter)) for i, chunk in enumerate(chunks)]
    values = {}
    for i, result in run_all(engine, submits):
        if isinstance(result, InputError):
            raise result
        if result.error is not None:
            raise result.error
        values[i] = [s.logprobs for s in result.sequences]
    return [v for i in range(len(chunks)) for v in values[i]]

@keywords_checked
def score(model, processor, images=None, prompt: str = "", candidates: Sequence[str] = (), include_eos: bool = True,
          batch_size: int = defaults.BATCH_SIZE, kv_bits: Optional[int] = None,
          adapter: Optional[str] = None) -> List[float]:
    """Per candidate, the summed log-probability of its tokens (and <eos>, unless include_eos=False) given the
    images and the prompt: the candidate that scores highest is the model's choice. `adapter`: the loaded adapter
    to score through (None: the base)."""
    return [math.fsum(v) for v in candidate_logprobs(model, processor, images, prompt, candidates, include_eos,
                                                     batch_size, kv_bits, adapter)]
