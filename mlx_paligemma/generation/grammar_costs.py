"""What a grammar may cost, checked before it is queued: its bytes, what llguidance cannot take, and its compile
time (a deadline, on a thread of its own). Limits are limits.LIMITS, which the server's flags set."""

import json
import threading
import time

from .. import limits
from ..errors import InputError, cause


def reason(error: str) -> str:
    """llguidance's message in one line: regex errors are drawings over several lines whose "error: ..." line
    names the problem; others end with the parser's state (the grammar itself), which is dropped."""
    lines = [l.strip() for l in error.splitlines() if l.strip()] or ["unknown error"]
    return next((l[len("error: "):] for l in lines if l.startswith("error: ")), lines[0])[:300]


def schema_text(schema: dict) -> str:
    try:
        return json.dumps(schema, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise InputError(f"the json schema cannot be read: {cause(e)}") from None


def check_bytes(what: str, n: int) -> None:
    if n > limits.LIMITS.max_constraint_bytes:
        raise InputError(f"{what} is {n} bytes, more than the limit of {limits.LIMITS.max_constraint_bytes}")


def grammar_of(build, what: str) -> str:
    """llguidance's grammar of a schema or regex; what it cannot take (a number past float range such as
    `"minimum": 1e400`) is a bad input, not a fault."""
    try:
        return build()
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise InputError(f"bad {what}: {cause(e)[:300]}") from None


# Grammars compile on threads of their own, so that a caller waits at most compile_seconds (llguidance releases the
# GIL while it builds a grammar); four at a time, so a flood of costly grammars queues instead of taking every core.
# One that runs past its deadline finishes within the parser limits, its result dropped; its thread is a daemon, so
# it never holds up the process's exit.
_COMPILING = threading.BoundedSemaphore(4)


def compile_with_deadline(build, what: str):
    seconds = limits.LIMITS.compile_seconds
    deadline = time.monotonic() + seconds
    if not _COMPILING.acquire(timeout=seconds):
        raise InputError(f"the {what} could not start compiling within {seconds:g} s (others are compiling): try "
                         "again")
    result = {}

    def run():
        try:
            result["value"] = build()
        except BaseException as e:  # handed to the caller, raised there
            result["error"] = e
        finally:
            _COMPILING.release()

    thread = threading.Thread(target=run, name="grammar", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if thread.is_alive():
        raise InputError(f"the {what} takes more than {seconds:g} s to compile: give a simpler one")
    if "error" in result:
        raise result["error"]
    return result["value"]
