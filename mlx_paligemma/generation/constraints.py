"""Structured output: a token mask per row that keeps an answer inside a JSON schema, a regular expression, a list
of choices, or PaliGemma's own detect/segment answer grammar.

The grammar engine is llguidance (Microsoft's, the one mlx-vlm's server uses). We compared it with xgrammar and
outlines-core on PaliGemma's tokenizers, handing each the same table of bytes per id, built alike from a
tokenizer.json or a sentencepiece-only tokenizer.model (benchmarks/constraints.py has the figures). llguidance:
- installs alone: a 3 MB wheel, no dependencies (xgrammar imports torch and, on Linux, pulls triton and CUDA wheels,
  gigabytes; outlines-core is 2 MB but takes only regexes, a JSON schema turned into one);
- takes Lark grammars that name tokens by id (`<[5-1028]>`), so the detect grammar asks for the <loc>/<seg> tokens
  themselves, not for text spelling them;
- compiles lazily (outlines-core builds its index over the whole vocabulary up front, per schema), forks a state
  cheaply (`deep_copy`, one per beam) and names a bad schema or regex before decoding;
- costs tens of microseconds a step on these vocabularies, like the others.

The engine calls `masks(constraints, vocab_size)` before sampling and `Constraint.advance(token)` after; see
`make_constraint` for the forms.
"""

import bisect
import json
import re
import reprlib
import time
import weakref
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..processing.answer_format import LOC_BINS, MASK_CODES, SEG_CODES, SEPARATOR
from ..processing.processor import IMAGE_TOKEN, PaliGemmaProcessor, Tokenizer
from .grammar_costs import check_bytes, compile_with_deadline, grammar_of, reason, schema_text
from ..errors import InputError, cause, read_json_object
from ..extras import require
from .. import limits
from ..limits import MAX_SCHEMA_FILE_BYTES

# PaliGemma's detect/segment answer, in detection's terms (LOC_BINS, SEG_CODES, MASK_CODES, SEPARATOR): objects
# joined by " ; ", each four <locNNNN> bins (y0, x0, y1, x1, 0..1023), for segment then 16 <segNNN> codes (0..127),
# then " " and the label.
# The reader drops a box of no area, so the grammar asks y0 < y1 and x0 < x1.
_LABEL_FORBIDDEN = re.compile(r"[;<\n]")  # the reader's label ends at ';' or '<'; an answer is one line
# Between JSON tokens: compact or pretty-printed, but bounded (llguidance's default, any run of whitespace, lets a
# model that drifts into whitespace never finish).
JSON_WHITESPACE = r"(\r?\n)?[ \t]{0,32}"
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _llguidance():
    require("structured", "structured output")
    import llguidance
    import llguidance.numpy

    return llguidance


class _Vocabulary:
    """llguidance's view of a tokenizer: the bytes each id writes, the special ids (written as nothing), and where
    the loc and seg codes sit."""

    def __init__(self, tokenizer: Tokenizer):
        llguidance = _llguidance()
        # <image> may follow the file's pieces (Tokenizer adds it when the file lacks it).
        pieces = [IMAGE_TOKEN if i == tokenizer.image_id else tokenizer.id_to_piece(i)
                  for i in range(tokenizer.vocab_size)]
        # Gemma's pieces: "▁" stands for a space, <0xNN> for one byte (byte fallback); both tokenizer kinds agree.
        tokens = [bytes([int(m.group(1), 16)]) if (m := _BYTE.fullmatch(p)) else p.replace("\u2581", " ").encode()
                  for p in pieces]
        special = sorted({*tokenizer.specials.values(), *(i for i, p in enumerate(pieces) if p in ("<unk>", "<mask>"))})
        encode = tokenizer.encode

        class Wrapped:  # the shape llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = tokenizer.eos_id, tokenizer.bos_id, special

            def __call__(self, text):
                return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        Wrapped.tokens = tokens
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
        self.size = len(tokens)
        # Text tokens by their bytes, sorted, to find every spelling of the text a grammar forces (see
        # Constraint._spellings).
        skip = set(special)
        self._sorted = sorted((b, i) for i, b in enumerate(tokens) if b and i not in skip)
        self._keys = [b for b, _ in self._sorted]
        self.longest = max(map(len, self._keys))
        self.eos_id = tokenizer.eos_id
        self.loc = self._range(tokenizer, "<loc{:04d}>", LOC_BINS)
        self.seg = self._range(tokenizer, "<seg{:03d}>", SEG_CODES)

    def spellings(self, forced: bytes) -> List[int]:
        """Text tokens whose bytes begin `forced` or begin with it."""
        ids = []
        for n in range(1, min(len(forced), self.longest) + 1):
            i = bisect.bisect_left(self._keys, forced[:n])
            while i < len(self._keys) and self._keys[i] == forced[:n]:
                ids.append(self._sorted[i][1])
                i += 1
        i = bisect.bisect_right(self._keys, forced)
        while i < len(self._keys) and self._keys[i].startswith(forced):
            ids.append(self._sorted[i][1])
            i += 1
        return ids

    @staticmethod
    def _range(tokenizer: Tokenizer, form: str, n: int) -> Optional[int]:
        """The id of the first of n consecutive code tokens, or None if the vocabulary lacks them."""
        ids = [tokenizer.piece_to_id(form.format(k)) for k in range(n)]
        return ids[0] if None not in ids and ids == list(range(ids[0], ids[0] + n)) else None


_VOCABULARIES = weakref.WeakKeyDictionary()  # built once per tokenizer (a full vocabulary takes a while)


def vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    if tokenizer not in _VOCABULARIES:
        _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
    return _VOCABULARIES[tokenizer]


class Constraint:
    """One row's grammar state. `allowed()` is the mask of the next token over the model's vocabulary (ids the
    tokenizer does not have are never allowed; <eos> exactly when the answer may end), `advance(token)` takes the
    token sampled, `done` says that only <eos> may follow, `copy()` forks the state (one per beam)."""

    def __init__(self, matcher, vocab: _Vocabulary, vocab_size: int, boxes: bool = False, field: str = "regex"):
        self._matcher, self._vocab, self.vocab_size = matcher, vocab, vocab_size
        self.field = field  # the setting it came from (response_format, json_schema, regex, choices, constrain)
        self._boxes = boxes  # order the loc tokens of each box
        self._run: List[int] = []  # loc bins since the last other token: the box being written
        self._bits = np.zeros((1, (vocab.size + 31) // 32), np.int32)

    def copy(self) -> "Constraint":
        other = Constraint(self._matcher.deep_copy(), self._vocab, self.vocab_size, self._boxes, self.field)
        other._run = list(self._run)
        return other

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped()

    def allowed_np(self) -> np.ndarray:
        mask = np.zeros(self.vocab_size, bool)
        if self._matcher.is_stopped() or self._matcher.is_error():
            mask[self._vocab.eos_id] = True  # end the row; advance() never lets an error state arise
            return mask
        _llguidance().numpy.fill_next_token_bitmask(self._matcher, self._bits)
        n = min(self._vocab.size, self.vocab_size)
        mask[:n] = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:n]
        # No token is longer than the vocabulary's longest: looking further ahead would find nothing more.
        forced = self._matcher.compute_ff_bytes()[:self._vocab.longest + 1]
        if forced:
            # Where the grammar fixes the next bytes, llguidance allows only the first token of their canonical
            # tokenization; a model may spell them otherwise (<loc0798> where "<loc07" is forced, or a byte token
            # for a letter), and the answer must stay the model's: allow every spelling the grammar accepts.
            for t in self._vocab.spellings(forced):
                if t < n and not mask[t] and self._matcher.validate_tokens([t]):
                    mask[t] = True
        if self._boxes and self._vocab.loc is not None:
            self._order_box(mask)
        return mask

    def allowed(self) -> mx.array:
        return mx.array(self.allowed_np())

    def _order_box(self, mask: np.ndarray) -> None:
        """y0 < y1 and x0 < x1: the third and fourth bins exceed the first and second, which therefore stop at 1022
        (a box is written loc tokens in a row, so the run's length says which bin comes next)."""
        loc, k = self._vocab.loc, len(self._run) % 4
        if k < 2:
            mask[loc + LOC_BINS - 1] = False
        else:
            mask[loc:loc + self._run[k - 2] + 1] = False

    def advance(self, token: int) -> None:
        token = int(token)
        if self._matcher.is_stopped():
            return  # the <eos> that ends the row
        loc = self._vocab.loc
        if self._boxes and loc is not None and loc <= token < loc + LOC_BINS:
            self._run = (self._run if len(self._run) < 4 else []) + [token - loc]
        else:
            self._run = []
        if not self._matcher.consume_token(token):
            # The matcher's message may quote the grammar (the request's own input): its first line says enough.
            raise InputError(f"the constraint fails at token {token}: {cause(RuntimeError(self._matcher.get_error()))}")


def masks(constraints: Sequence[Optional[Constraint]], vocab_size: int,
          fail: Optional[Callable[[int, Exception], None]] = None) -> Optional[mx.array]:
    """(B, vocab_size) bool masks for a batch's rows, all True for rows without a constraint; None when no row has
    one (the unconstrained batch stays as it was). A row whose grammar fails goes to `fail(i, error)` (its request
    ends alone; its mask allows everything, its token is dropped), or raises without it."""
    if all(c is None for c in constraints):
        return None
    out = np.ones((len(constraints), vocab_size), bool)
    for i, c in enumerate(constraints):
        if c is not None:
            try:
                out[i] = c.allowed_np()
            except Exception as e:
                if fail is None:
                    raise
                fail(i, e)
    return mx.array(out)


def apply_masks(logits: mx.array, constraints: Sequence[Optional[Constraint]],
                fail: Optional[Callable[[int, Exception], None]] = None) -> mx.array:
    """(B, V) logits with the tokens the rows' constraints forbid at -inf."""
    allowed = masks(constraints, logits.shape[-1], fail)
    return logits if allowed is None else mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))


# The forms.

def schema_from_response_format(response_format) -> Optional[dict]:
    """OpenAI's `response_format`: {"type": "json_schema", "json_schema": {"schema": {...}}} -> the schema,
    {"type": "json_object"} -> any JSON object, {"type": "text"} or None -> None."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InputError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return schema
    raise InputError("response_format must be {'type': 'json_schema', 'json_schema': {...}}, {'type': "
                     f"'json_object'}} or {{'type': 'text'}}, got {str(response_format)[:80]}")


def _literal(text: str) -> str:
    """A regex matching exactly `text`: every character but letters and digits written as \\x{HEX}."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def task_labels(prompt: str):
    """('detect' or 'segment', [classes]) for a detect/segment prompt, else None."""
    words = prompt.replace(IMAGE_TOKEN, "").strip().split(None, 1)
    if not words or words[0] not in ("detect", "segment"):
        return None
    return words[0], [c.strip() for c in (words[1] if len(words) > 1 else "").split(";")]


def task_grammar(task: str, labels: Sequence[str], vocab: _Vocabulary) -> str:
    """The Lark grammar of a detect/segment answer over `labels`: zero or more objects joined by SEPARATOR."""
    if vocab.loc is None or (task == "segment" and vocab.seg is None):
        raise InputError(f"constrain=True: this tokenizer has no <loc>{'/<seg>' if task == 'segment' else ''} "
                         "tokens, so it cannot write a detect/segment answer")
    codes = f' " "? seg{{{MASK_CODES}}}' if task == "segment" else ""
    label = " | ".join(json.dumps(" " + l, ensure_ascii=False) for l in labels)
    return "\n".join([
        f"start: (object ({json.dumps(SEPARATOR)} object)*)?",
        f"object: loc loc loc loc{codes} label",
        f"loc: <[{vocab.loc}-{vocab.loc + LOC_BINS - 1}]>",
        *([f"seg: <[{vocab.seg}-{vocab.seg + SEG_CODES - 1}]>"] if task == "segment" else []),
        f"label: {label}",
    ])


def make_constraint(processor: PaliGemmaProcessor, vocab_size: int, prompt: str = "", response_format=None,
                    json_schema: Union[dict, str, None] = None, regex: Optional[str] = None,
                    choices: Optional[Sequence[str]] = None, constrain: bool = False,
                    labels: Optional[Sequence[str]] = None) -> Optional[Constraint]:
    """The constraint of one request, or None when it asks for none (or constrain=True on a prompt that is neither
    detect nor segment). At most one form:
    - response_format: OpenAI's, json_schema or json_object (see schema_from_response_format);
    - json_schema: a JSON schema, as a dict or its JSON text;
    - regex: the whole answer matches it;
    - choices: the answer is one of these strings;
    - constrain=True: PaliGemma's answer grammar for `detect A ; B` / `segment A` prompts, labels among the prompt's
      classes (or `labels`, a subset of them), boxes with y0 < y1 and x0 < x1, for segment 16 mask codes.
    A bad one is an InputError, before any decoding. `vocab_size` is the model's (its embedding may have more rows
    than the tokenizer has pieces)."""
    named = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                  ("regex", regex), ("choices", choices)) if v is not None]
    field = (named + ["constrain"])[0] if named or constrain or labels is not None else None
    try:
        return _make_constraint(processor, vocab_size, prompt, response_format, json_schema, regex, choices,
                                constrain, labels, field)
    except InputError as e:
        e.param = e.param or field
        raise


def _make_constraint(processor, vocab_size, prompt, response_format, json_schema, regex, choices, constrain, labels,
                     field) -> Optional[Constraint]:
    schema = schema_from_response_format(response_format)
    given = [name for name, v in (("response_format", schema), ("json_schema", json_schema), ("regex", regex),
                                  ("choices", choices)) if v is not None] + (["constrain"] if constrain else [])
    if len(given) > 1:
        raise InputError(f"give one constraint, not {' and '.join(given)}")
    if labels is not None and not constrain:
        raise InputError("labels= restricts constrain=True's detect/segment answers: set constrain=True")
    schema = schema if schema is not None else json_schema
    boxes = False
    if schema is not None:
        what = "json schema"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as e:
                raise InputError(f"the json schema is not valid JSON: {cause(e)}") from None
        if not isinstance(schema, dict):
            raise InputError(f"a json schema is a JSON object, not a {type(schema).__name__}")
        if "x-guidance" not in schema:  # llguidance's own options, when the schema gives none
            schema = {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        check_bytes("the json schema", len(schema_text(schema).encode("utf-8", "surrogatepass")))
        grammar = grammar_of(lambda: _llguidance().LLMatcher.grammar_from_json_schema(schema_text(schema)), what)
    elif regex is not None:
        if not isinstance(regex, str):
            raise InputError(f"regex must be a string, not {type(regex).__name__}")
        check_bytes("the regex", len(regex.encode("utf-8", "surrogatepass")))
        what = f"regex {reprlib.repr(regex)}"
        grammar = grammar_of(lambda: _llguidance().LLMatcher.grammar_from_regex(regex), what)
    elif choices is not None:
        what = "choices"
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices or not all(
                isinstance(c, str) and c for c in choices):
            raise InputError("choices must be a non-empty list of non-empty strings")
        if len(choices) > limits.LIMITS.max_choices:
            raise InputError(f"choices has {len(choices)} strings, more than the limit of "
                             f"{limits.LIMITS.max_choices}")
        check_bytes("the choices", sum(len(c.encode("utf-8", "surrogatepass")) for c in choices))
        grammar = grammar_of(lambda: _llguidance().LLMatcher.grammar_from_regex("|".join(map(_literal, choices))),
                           what)
    elif constrain:
        task = task_labels(prompt)
        if task is None:
            return None  # answer, caption, ...: PaliGemma's free-text tasks have no grammar
        task, classes = task
        if not any(classes):
            raise InputError(f"constrain=True: {task} needs classes, e.g. '{task} cat ; dog'")
        bad = [c for c in classes if not c or _LABEL_FORBIDDEN.search(c)]
        if bad:
            raise InputError(f"constrain=True: the prompt's class {bad[0]!r} cannot be a label "
                             "(empty, or holds ';', '<' or a newline)")
        if labels is not None:
            if isinstance(labels, str) or not labels:
                raise InputError("labels must be a non-empty list of the prompt's classes")
            stray = [l for l in labels if l not in classes]
            if stray:
                raise InputError(f"label {stray[0]!r} is not among the prompt's classes {classes}")
            classes = list(labels)
        what, boxes = f"{task} grammar", True
        grammar = None
    else:
        return None
    vocab = vocabulary(processor.tokenizer)
    if grammar is None:
        grammar = task_grammar(task, list(dict.fromkeys(classes)), vocab)
    return compile_with_deadline(lambda: _compile(grammar, what, vocab, vocab_size, boxes, field), what)


def _compile(grammar: str, what: str, vocab: _Vocabulary, vocab_size: int, boxes: bool,
             field: str) -> Constraint:
    """The matcher of a grammar within the parser limits, its first mask, and one step on a copy: a grammar that
    fails at the first token (a limit it reaches only then) is refused here, before it is queued."""
    ll = _llguidance()
    now = limits.LIMITS  # read at each call: the server's flags set them at start-up
    parser = ll.LLParserLimits(max_grammar_size=now.max_grammar_size, max_lexer_states=now.max_lexer_states,
                               initial_lexer_fuel=now.initial_lexer_fuel, step_lexer_fuel=now.step_lexer_fuel,
                               step_max_items=now.step_max_items, verbose_errors=False)
    matcher = ll.LLMatcher(vocab.ll, grammar, log_level=0, limits=parser)
    if matcher.is_error():
        raise InputError(f"bad {what}: {reason(matcher.get_error())}")
    constraint = Constraint(matcher, vocab, vocab_size, boxes, field)
    mask = constraint.allowed_np()  # the first mask finds a grammar that can write nothing at all
    if matcher.is_error():
        raise InputError(f"the {what} matches no answer ({reason(matcher.get_error())})")
    trial = constraint.copy()
    first = int(np.flatnonzero(mask)[0])
    if first == vocab.eos_id or trial._matcher.is_stopped():
        return constraint
    if not trial._matcher.consume_token(first):
        raise InputError(f"the {what} fails at its first token: {reason(trial._matcher.get_error())}")
    # The second mask is what every later token costs (the first builds the lexer's start, once).
    tic = time.perf_counter()
    trial.allowed_np()
    seconds = time.perf_counter() - tic
    if seconds > now.mask_seconds:  # paid at every token, with every row of the batch waiting on it
        raise InputError(f"the {what} takes {seconds:.2f} s a token to follow, more than the limit of "
                         f"{now.mask_seconds:g} s: give a simpler one")
    return constraint



def cli_constraint(args) -> dict:
    """--json-schema FILE / --regex / --choices a,b,c / --constrain, those the command has, as the API's keywords
    (the schema file read, and llguidance imported, now: before the model loads)."""
    given = {name: getattr(args, name, None) for name in ("json_schema", "regex", "choices", "constrain")}
    if any(v not in (None, False) for v in given.values()):
        _llguidance()
    if given["json_schema"] is not None:
        return {"json_schema": read_json_object(Path(given["json_schema"]), MAX_SCHEMA_FILE_BYTES, "--json-schema")}
    if given["regex"] is not None:
        return {"regex": given["regex"]}
    if given["choices"] is not None:
        return {"choices": given["choices"]}
    return {"constrain": True} if given["constrain"] else {}
