"""JSON in and out of the server: a request body parsed within bounds, and every response written as valid JSON.

In: json.loads builds a Python object for every value, 64 to 250 bytes each, whatever the body spends on it: a 32 MiB
body of `{}` items (3 bytes each) builds 0.8 GB. So the body's values are counted, and its nesting measured, by a
scanner before anything is built (limits.MAX_JSON_VALUES, MAX_JSON_DEPTH): what a parse holds is then the body, its
text (a character takes up to 4 bytes in Python), its strings (the same) and at most ~130 bytes a counted value:
with the server's 32 MiB bodies, a few hundred MB at the very worst, not tens of GB. NaN, Infinity and numbers past
float range are not JSON numbers (RFC 8259): refused, so none reaches a setting or an answer.

Out: JSON has no NaN or Infinity either (Python writes them, and strict parsers refuse the whole reply). A float
that is not finite, such as the log-probability of a token that a constraint forbids (-inf), is written null.
"""

import json
import math
import re
from typing import Any

from ..errors import InputError
from ..limits import MAX_JSON_DEPTH, MAX_JSON_VALUES

# Outside strings, what a count needs: a string whole (its escapes taken out first), an unterminated quote (the
# parse names the error), an opening bracket (a value), a comma (one more value or member), a closing bracket.
_TOKENS = re.compile(rb'"[^"]*"|"|[\[{]|,|[\]}]')


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def check_structure(data: bytes) -> None:
    """An InputError if the JSON text `data` holds more than MAX_JSON_VALUES values (counted as its containers and
    commas: every value but the first of each container follows a comma) or nests deeper than MAX_JSON_DEPTH. Only
    a bound: a body that is not JSON is left to the parse to name."""
    # Escaped characters are no structure: take out each escaped backslash, then each escaped quote (C-speed
    # replaces; a regular expression skipping escapes one by one needs memory for each).
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in data else data
    values = depth = 0
    for token in _TOKENS.finditer(text):
        kind = token.group()[:1]
        if kind == b'"':
            if len(token.group()) == 1:  # no closing quote
                return
            continue
        if kind in b"]}":
            depth -= 1
            continue
        values += 1
        if values > MAX_JSON_VALUES:
            raise InputError(f"the request body holds more than {MAX_JSON_VALUES} JSON values (items, members and "
                             "containers), more than this server reads")
        if kind != b",":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"the request body's JSON is nested too deeply: more than {MAX_JSON_DEPTH} levels")


def loads(data: bytes) -> Any:
    """The body's JSON within the bounds, or an InputError naming what is wrong."""
    check_structure(data)
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"the request body is not valid JSON: {' '.join(str(e).split())[:300]}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(content: Any) -> str:
    """The one encoder of what the server sends (JSON bodies and server-sent events): valid JSON, non-finite floats
    as null, in ASCII (a lone surrogate that a client sent and a message quotes cannot make it fail to encode)."""
    try:
        return json.dumps(content, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a float that is not finite: rare, so the copy without them is made only then
        return json.dumps(_finite(content), separators=(",", ":"), allow_nan=False)
