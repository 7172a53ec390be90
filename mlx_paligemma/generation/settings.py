"""Every setting, declared once: SETTINGS, the table of each one's name, type, values, default, help, and what the
neighbours (OpenAI's API, transformers, mlx-lm) call it. Made from it: `Settings` (how one request is answered, a
field per request setting) and `check_settings`, the one check of them (the API, the engine, the command lines before
a model loads and the server all call it, so a bad value is one InputError line whose `param` names the setting,
worded the same everywhere); the did-you-mean of a keyword, flag or field nobody takes (`unknown_keyword`); every
command's flags (cli.add_settings); the server's request fields (server/chat.py); the options tables of docs/
(tests/test_settings_table.py holds them to it). A setting has one name on every surface: the Python keyword, the
server's field and a run's record are its name, the flag is its name with dashes.

A constraint's content (a schema, a regex) is checked when it is compiled (constraints.make_constraint); only its
shape is checked here.
"""

import difflib
import functools
import inspect
import math
import warnings
from dataclasses import dataclass, make_dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

from .. import defaults, limits
from ..errors import InputError

MAX_LOGPROBS = 20  # alternatives a token may carry, as OpenAI's top_logprobs
MAX_BEST_OF = 64  # samples of one best_of (or n) request: rows of the batch, so its cost is bounded before it starts

COMMANDS = ("generate", "batch", "evaluate")  # the commands that generate, with a flag for most settings
API = ("generate", "stream_generate", "batch_generate")  # the Python functions taking every request setting


@dataclass(frozen=True)
class Setting:
    """One row of the table."""

    name: str  # the Python keyword, the server's field, the key in a run's record; the flag is --name-with-dashes
    type: Any  # int, float, bool, str, list (of strings), dict, or object (anything its own check takes)
    default: Any
    values: str  # the values it takes, as the help and the docs say them
    help: str
    openai: str = ""  # what OpenAI's API calls it ("": no such setting there)
    transformers: str = ""  # transformers' generate()
    mlx_lm: str = ""  # mlx-lm's generate and command line
    others: Tuple[str, ...] = ()  # other names people bring (mlx-vlm, vLLM, big_vision, our previous release)
    opposite: str = ""  # a name for its negation: did-you-mean answers `name=False`
    commands: Tuple[str, ...] = COMMANDS  # the commands with a flag for it ("server": a flag of the server)
    field: bool = True  # a field of the server's requests
    request: bool = True  # of each request (a field of Settings); False: of a whole run (an engine, a reader)
    python: Tuple[str, ...] = API  # the Python functions that take it as a keyword
    flags: Tuple[str, ...] = ()  # the flag's other spellings
    metavar: Optional[str] = None
    none: str = "off"  # what a default of None means, said by --help and the docs

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        """The default as --help and the docs show it."""
        if self.default is None or self.default == ():
            return self.none
        if self.type is bool:
            return "on" if self.default else "off"
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    @property
    def neighbours(self) -> Tuple[str, ...]:
        """Every other name for it, each said by did-you-mean."""
        return tuple(n for n in (self.openai, self.transformers, self.mlx_lm, *self.others) if n and n != self.name)


_ANY = "any finite number"
SETTINGS = (
    Setting("max_tokens", int, defaults.MAX_TOKENS, "[1, ...)", "most tokens to generate per answer",
            openai="max_completion_tokens", transformers="max_new_tokens", mlx_lm="max_tokens",
            others=("max_length", "max_new_token")),
    Setting("temperature", float, defaults.TEMPERATURE, "0 or [1e-4, ...)", "0 is greedy", openai="temperature",
            transformers="temperature", mlx_lm="temp", others=("do_sample",), flags=("--temp",)),
    Setting("top_p", float, defaults.TOP_P, "(0, 1]", "nucleus sampling; 1 is off", openai="top_p",
            transformers="top_p", mlx_lm="top_p"),
    Setting("top_k", int, defaults.TOP_K, "[0, ...)", "sample among the k likeliest; 0 is off",
            transformers="top_k", mlx_lm="top_k"),
    Setting("min_p", float, defaults.MIN_P, "[0, 1]", "drop tokens below min_p x the likeliest; 0 is off",
            transformers="min_p", mlx_lm="min_p"),
    Setting("repetition_penalty", float, None, "(0, ...)", "e.g. 1.1 for long answers that loop",
            transformers="repetition_penalty", mlx_lm="repetition_penalty"),
    Setting("repetition_context_size", int, defaults.REPETITION_CONTEXT_SIZE, "[1, ...)",
            "tokens the repetition penalty looks back on", mlx_lm="repetition_context_size"),
    Setting("logit_bias", dict, None, "{token id: bias}", "added to those tokens' logits at every step",
            openai="logit_bias", transformers="sequence_bias", mlx_lm="logit_bias", commands=()),
    Setting("seed", int, None, "[0, 2**64)", "random seed of sampling; answer i of several (n, best_of, a "
            "dataset's item i) is seeded seed + i", openai="seed", mlx_lm="seed", others=("random_seed",),
            none="a fresh one"),
    Setting("stop", list, (), "strings", "end the answer where one of these strings appears (not shown); repeat "
            "the flag for several", openai="stop", transformers="stop_strings",
            others=("stop_sequences", "stop_words"), metavar="TEXT", none="none"),
    Setting("logprobs", int, defaults.LOGPROBS, f"[0, {MAX_LOGPROBS}]", "each token's log-probability (0) and its "
            "K likeliest alternatives", openai="top_logprobs", transformers="output_logits",
            others=("return_logprobs",), commands=("generate", "batch"), metavar="K"),
    Setting("num_beams", int, defaults.NUM_BEAMS, "[1, ...)", "beam search as transformers' generate(num_beams=...); "
            "1 is off", transformers="num_beams", others=("beam_size", "beams")),
    Setting("length_penalty", float, defaults.LENGTH_PENALTY, _ANY,
            "beam search: a finished answer scores its log-probability / length ** this",
            transformers="length_penalty"),
    Setting("early_stopping", object, defaults.EARLY_STOPPING, "true, false or never", "beam search: when to stop, "
            "as transformers", transformers="early_stopping"),
    Setting("num_return_sequences", int, 1, "[1, num_beams or best_of]", "how many of the beams (or best_of "
            "samples) to return, best first", transformers="num_return_sequences",
            openai="n", others=("num_return_sequence",), commands=(), field=False),
    Setting("best_of", int, defaults.BEST_OF, f"[1, {MAX_BEST_OF}]", "big_vision's best_of_n: sample N answers "
            "(with a temperature) and keep the likeliest", openai="best_of", others=("best_of_n",), metavar="N"),
    Setting("n", int, 1, f"[1, {MAX_BEST_OF}]", "that many sampled answers sharing one prefill", openai="n",
            others=("num_samples",), commands=()),
    Setting("adapter", str, None, "a loaded adapter's name", "the LoRA adapter that answers (the server: the "
            "request's model; a dataset's item: its adapter field)", openai="model", commands=(), field=False,
            none="the base"),
    Setting("response_format", object, None, "OpenAI's json_schema or json_object", "structured output, as "
            "OpenAI's", openai="response_format", commands=()),
    Setting("json_schema", object, None, "a JSON schema", "answers are JSON valid against this schema (a file on "
            "the command line)", openai="response_format", others=("guided_json", "schema"), field=False,
            metavar="FILE"),
    Setting("regex", str, None, "a regular expression", "each whole answer matches this regular expression",
            others=("guided_regex", "pattern")),
    Setting("choices", list, None, "strings", "each answer is one of these strings (comma-separated on the command "
            "line)", others=("guided_choice",), commands=("generate", "batch"), metavar="A,B,C"),
    Setting("constrain", bool, False, "true or false", "detect/segment prompts: well-formed boxes (and masks) whose "
            "labels are among the prompt's classes"),
    # Of a whole run.
    Setting("deterministic", bool, False, "true or false", "batch-invariant decoding: each answer bitwise what it is "
            "alone, whatever shares its decode steps (slower)", others=("batch_invariant",),
            commands=COMMANDS + ("server",), field=False, request=False),
    Setting("kv_bits", int, None, "4 or 8", "quantize the KV cache, for long prompts", mlx_lm="kv_bits",
            commands=("generate", "batch"), field=False, request=False, python=API + ("score",)),
    Setting("batch_size", int, defaults.BATCH_SIZE, "[1, ...)", "rows sharing each decode step",
            mlx_lm="batch_size", commands=("batch", "evaluate", "server"), field=False, request=False,
            python=("batch_generate", "score")),
    Setting("min_score", float, defaults.MIN_SCORE, "[0, 1]", "leave out detected objects whose score (the mean "
            "probability of their box and label tokens) is below this", others=("score_threshold", "threshold"),
            commands=("generate", "batch"), request=False, python=("generate", "batch_generate")),
    Setting("include_eos", bool, True, "true or false", "score candidates with their end (the eos token); off: "
            "as the start of an answer", opposite="exclude_eos", commands=("generate",), field=False, request=False,
            python=("score",)),
)
BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}
CONSTRAINTS = ("response_format", "json_schema", "regex", "choices", "constrain")
# Other names, by the name people bring: what did-you-mean answers.
NEIGHBOURS = {n: s.name for s in SETTINGS for n in s.neighbours if n not in BY_NAME}
NEIGHBOURS.update({s.opposite: f"{s.name}=False" for s in SETTINGS if s.opposite})
NEIGHBOURS["image_path"] = "images"


def _constraint(self) -> Dict[str, Any]:
    """make_constraint's keywords."""
    return {name: getattr(self, name) for name in CONSTRAINTS}


# How to answer one request: checked values, a field per request setting of the table, with its default.
Settings = make_dataclass("Settings", [(s.name, Any, s.default) for s in SETTINGS if s.request], frozen=True,
                          namespace={"constraint": _constraint, "__module__": __name__})
NAMES = tuple(s.name for s in SETTINGS if s.request)


def did_you_mean(name: str, known: Iterable[str] = ()) -> Optional[str]:
    """The name meant by `name` (a neighbour's name, or a typo of a setting or of `known`), or None."""
    return NEIGHBOURS.get(name) or next(iter(difflib.get_close_matches(name, list(known) + list(BY_NAME), 1, 0.6)),
                                        None)


def unknown_keyword(name: str, where: str, known: Iterable[str] = ()) -> InputError:
    """A keyword nobody takes (`temp=`, `max_new_tokens=`): one line saying what to write instead."""
    close = did_you_mean(name, known)
    hint = f": did you mean {close}?" if close else ""
    return InputError(f"{where} got an unknown keyword {name}{hint}", param=name)


def keywords_checked(function):
    """`function`, a keyword it does not take being one InputError line with did-you-mean instead of a TypeError
    (`score(exclude_eos=True)`: did you mean include_eos=False?)."""
    known = inspect.signature(function).parameters

    @functools.wraps(function)
    def checked(*args, **kwargs):
        for name in kwargs:
            if name not in known:
                raise unknown_keyword(name, f"{function.__name__}()", known)
        return function(*args, **kwargs)

    return checked


def renamed(given: dict, old: str, new: str, value):
    """`value`, or a keyword's value under its previous release's name, which warns (it goes in the next)."""
    if old not in given:
        return value
    warnings.warn(f"{old}= is now {new}=", DeprecationWarning, stacklevel=3)
    return given.pop(old)


def check_kv_bits(kv_bits) -> None:
    if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in (4, 8)):
        raise InputError(f"kv_bits must be 4 or 8, got {kv_bits!r}", param="kv_bits")


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
