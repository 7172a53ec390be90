"""The one check of generation settings: `check_settings(**given)` returns a typed Settings or raises one InputError
line whose `param` names the setting. The API, the engine (every Request), the command lines (before a model loads)
and the server (before a request is queued, its error `param` from this one) all call it, so a bad value is one
line, worded the same everywhere. A constraint's content (a schema, a regex) is checked when it is compiled
(constraints.make_constraint); only its shape is checked here.
"""

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

from .. import defaults, limits
from ..errors import InputError

MAX_LOGPROBS = 20  # alternatives a token may carry, as OpenAI's top_logprobs
MAX_BEST_OF = 64  # samples of one best_of (or n) request: rows of the batch, so its cost is bounded before it starts
CONSTRAINTS = ("response_format", "json_schema", "regex", "choices", "constrain")
# Names people bring from transformers, mlx-lm, mlx-vlm and vLLM, and what we call them.
NEIGHBOURS = {"max_new_tokens": "max_tokens", "max_length": "max_tokens", "temp": "temperature", "do_sample": "temperature",
              "top_logprobs": "logprobs", "random_seed": "seed", "stop_strings": "stop", "stop_sequences": "stop",
              "guided_regex": "regex", "guided_choice": "choices", "guided_json": "json_schema",
              "image_path": "images", "num_return_sequence": "num_return_sequences"}


@dataclass(frozen=True)
class Settings:
    """How to answer: checked values, with the defaults of defaults.py."""

    max_tokens: int = defaults.MAX_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    top_k: int = defaults.TOP_K
    min_p: float = defaults.MIN_P
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = defaults.REPETITION_CONTEXT_SIZE
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = defaults.LOGPROBS  # None: none asked; 0: each token's own; k: and k alternatives
    num_beams: int = defaults.NUM_BEAMS
    length_penalty: float = defaults.LENGTH_PENALTY
    early_stopping: Union[bool, str] = defaults.EARLY_STOPPING  # True, False or "never", as transformers
    num_return_sequences: int = 1
    best_of: int = defaults.BEST_OF
    n: int = 1
    adapter: Optional[str] = None  # the loaded LoRA adapter the rows run through, by name (None: the base)
    # Structured output, at most one (constraints.make_constraint compiles it).
    response_format: Any = None
    json_schema: Any = None
    regex: Optional[str] = None
    choices: Optional[Sequence[str]] = None
    constrain: bool = False

    def constraint(self) -> Dict[str, Any]:
        """make_constraint's keywords."""
        return {name: getattr(self, name) for name in CONSTRAINTS}


NAMES = tuple(f.name for f in fields(Settings))


def unknown_keyword(name: str, where: str, known: Iterable[str] = ()) -> InputError:
    """A keyword nobody takes (`temp=`, `max_new_tokens=`): one line saying what to write instead."""
    close = NEIGHBOURS.get(name) or next(iter(difflib.get_close_matches(name, list(known) + list(NAMES), 1, 0.6)),
                                         None)
    hint = f": did you mean {close}?" if close else ""
    return InputError(f"{where} got an unknown keyword {name}{hint}", param=name)


def check_settings(where: str = "generation", known: Iterable[str] = (), **given) -> Settings:
    """Every setting and their combinations, before any work. `where` names the caller in an unknown keyword's
    message, `known` the caller's own keywords (for its did-you-mean)."""
    for name in given:
        if name not in NAMES:
            raise unknown_keyword(name, where, known)
    s = Settings(**given)
    _check_values(s)
    _check_combinations(s)
    return s


def _number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v!r}", param=name)


def _integer(name: str, v, low: int, high: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise InputError(f"{name} must be an integer >= {low}, got {v!r}", param=name)
    if high is not None and v > high:
        raise InputError(f"{name} must be at most {high}, got {v}", param=name)


def _check_values(s: Settings) -> None:
    _integer("max_tokens", s.max_tokens, 1)
    _number("temperature", s.temperature)
    if s.temperature < 0 or 0 < s.temperature < 1e-4:
        # Dividing log-probabilities by less overflows float32 and would sample at random, not nearly greedily.
        raise InputError(f"temperature must be 0 (greedy) or at least 1e-4, got {s.temperature}", param="temperature")
    _number("top_p", s.top_p)
    if not 0 < s.top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {s.top_p}", param="top_p")
    _integer("top_k", s.top_k, 0)
    _number("min_p", s.min_p)
    if not 0 <= s.min_p <= 1:
        raise InputError(f"min_p must be in [0, 1], got {s.min_p}", param="min_p")
    if s.repetition_penalty is not None:
        _number("repetition_penalty", s.repetition_penalty)
        if s.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {s.repetition_penalty}", param="repetition_penalty")
    _integer("repetition_context_size", s.repetition_context_size, 1)
    if s.logit_bias is not None and not (isinstance(s.logit_bias, dict) and all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) for k, v in s.logit_bias.items())):
        raise InputError("logit_bias must map token ids to finite numbers", param="logit_bias")
    if s.seed is not None:
        _integer("seed", s.seed, 0)
        if s.seed + max(s.n, s.best_of) - 1 >= 2**64:  # row i of n (best_of) is seeded seed + i
            raise InputError(f"seed must be below 2**64 - {max(s.n, s.best_of) - 1}, got {s.seed}"
                             if max(s.n, s.best_of) > 1 else f"seed must be below 2**64, got {s.seed}", param="seed")
    stop = [s.stop] if isinstance(s.stop, str) else s.stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
        raise InputError("stop must be a list of non-empty strings", param="stop")
    object.__setattr__(s, "stop", tuple(stop))
    if s.logprobs is not None:
        _integer("logprobs", s.logprobs, 0, MAX_LOGPROBS)
    _integer("num_beams", s.num_beams, 1)
    _number("length_penalty", s.length_penalty)
    if s.early_stopping not in (True, False, "never"):
        raise InputError(f"early_stopping must be true, false or 'never', got {s.early_stopping!r}",
                         param="early_stopping")
    _integer("best_of", s.best_of, 1, MAX_BEST_OF)
    _integer("n", s.n, 1, MAX_BEST_OF)
    _integer("num_return_sequences", s.num_return_sequences, 1)
    if not isinstance(s.constrain, bool):
        raise InputError(f"constrain must be true or false, got {s.constrain!r}", param="constrain")
    # The count alone, before anything reads the strings: a million of them is refused before it is queued.
    if isinstance(s.choices, (list, tuple)) and len(s.choices) > limits.LIMITS.max_choices:
        raise InputError(f"choices has {len(s.choices)} strings, more than the limit of {limits.LIMITS.max_choices}",
                         param="choices")
    if s.adapter is not None and not isinstance(s.adapter, str):
        raise InputError(f"adapter must be an adapter's name or None (the base), got {type(s.adapter).__name__}",
                         param="adapter")


def _check_combinations(s: Settings) -> None:
    kinds = [f"{name} > 1" for name in ("num_beams", "best_of", "n") if getattr(s, name) > 1]
    if len(kinds) > 1:
        raise InputError(f"{' and '.join(kinds)}: give one way of making several answers, not both",
                         param=kinds[0].split()[0])
    for name in ("num_beams", "best_of"):
        if getattr(s, name) > 1 and s.logprobs:
            raise InputError(f"logprobs={s.logprobs} with {name} > 1: the answers' tokens carry their own "
                             "log-probabilities but no alternatives; leave logprobs (top alternatives) at 0",
                             param="logprobs")
    if s.num_return_sequences > max(s.num_beams, s.best_of):
        raise InputError(f"num_return_sequences ({s.num_return_sequences}) must be at most num_beams ({s.num_beams}) "
                         f"or best_of ({s.best_of})", param="num_return_sequences")
    if s.num_beams > 1:
        # transformers' beam sampling and its processors are not reproduced: refused rather than ignored.
        if s.temperature > 0:
            raise InputError("num_beams > 1 decodes deterministically: leave temperature at 0", param="num_beams")
        for name in ("repetition_penalty", "logit_bias", "stop"):
            if getattr(s, name):
                raise InputError("num_beams > 1 takes no repetition_penalty, logit_bias or stop strings", param=name)
    if s.best_of > 1 and s.temperature == 0:
        raise InputError("best_of > 1 keeps the likeliest of several samples: give a temperature > 0",
                         param="best_of")
    given = [name for name in CONSTRAINTS if getattr(s, name) not in (None, False)]
    if len(given) > 1:
        raise InputError(f"give one constraint, not {' and '.join(given)}", param=given[1])
