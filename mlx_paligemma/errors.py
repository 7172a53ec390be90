"""The package's one error type for bad user input, and the helpers that keep its messages to one line.

Every layer raises InputError for input a user can fix; commands print its message as one line (exit 1) and the
server answers it as a 4xx JSON error.
"""

import json
import os
import re
import stat
from pathlib import Path
from typing import Optional

from .limits import MAX_JSON_FILE_BYTES


class InputError(ValueError):
    """Bad user input (image, prompt, folder): the message is one line that names the problem, and `param` the
    setting or field it is about when there is one (the server's error `param`)."""

    def __init__(self, message: str = "", param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class Conflict(InputError):
    """Refused for what is loaded or running now, not for what was asked (an adapter name taken, every adapter
    place taken, an adapter in use): the server's 409, told by its type, not its words."""


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


def open_regular(file, what: str = "") -> int:
    """A file descriptor of `file`, or one line saying why not: a regular file only. Opened without blocking and
    checked after opening (no race), so a FIFO with no writer, a device (/dev/zero) or a folder is refused at once
    instead of hanging or reading without end."""
    name = f"{what} {file}" if what else str(file)
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise InputError(f"cannot read {name}: it is {kind}, not a regular file")
    return fd


def read_bounded(file, limit: int, what: str = "") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or one line saying why not (see open_regular); a file
    that grows past the limit while it is read is refused too (at most limit + 1 bytes are read)."""
    fd = open_regular(file, what)
    name = f"{what} {file}" if what else str(file)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise InputError(f"{name} is {max(size, len(data))} bytes or more, more than the limit of {limit}")
    return data


def read_json_object(file: Path, limit: int = MAX_JSON_FILE_BYTES, what: str = "") -> dict:
    """A JSON object from a regular file of at most `limit` bytes (config, processor, index, schema or annotation
    files), or one line saying why not."""
    data = read_bounded(file, limit, what)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{file} is not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"{file} is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{file} is not valid JSON: {e}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise InputError(f"{file} is not valid JSON: {cause(e)}") from None
    if not isinstance(value, dict):
        raise InputError(f"{file} is not a JSON object: it holds a JSON {type(value).__name__}")
    return value
