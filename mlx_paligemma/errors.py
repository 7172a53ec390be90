"""The package's one error type for bad user input, and the helpers that keep its messages to one line.

Every layer raises InputError for input a user can fix; commands print its message as one line (exit 1) and the
server answers it as a 4xx JSON error.
"""

import json
import re
from pathlib import Path
from typing import Optional


class InputError(ValueError):
    """Bad user input (image, prompt, folder): the message is one line that names the problem, and `param` the
    setting or field it is about when there is one (the server's error `param`)."""

    def __init__(self, message: str = "", param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def cause(e: Exception) -> str:
    """The first line of an exception's message, or its type when it has none; an object's repr in it
    (`<_io.BytesIO object at 0x7f...>`, which PIL puts in its messages) becomes the object's type."""
    message = _REPR.sub(lambda m: m.group(1).rsplit(".", 1)[-1], str(e).strip())
    return message.splitlines()[0] if message else type(e).__name__


_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def check_text(text: str, what: str) -> None:
    # The tokenizers library fails on lone surrogates (a str that is not Unicode) with a TypeError.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid text: lone surrogate {text[e.start]!r} at character {e.start}") from None


def read_json_object(file: Path) -> dict:
    """A JSON object from a file (config, processor or index files), or one line saying why not."""
    try:
        value = json.loads(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{file} is not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"{file} is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(value, dict):
        raise InputError(f"{file} is not a JSON object: it holds a JSON {type(value).__name__}")
    return value
