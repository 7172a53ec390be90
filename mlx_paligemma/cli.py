"""How every command line ends: one `error:` line and a non-zero exit code for bad input, never a traceback.

Set MLX_PALIGEMMA_DEBUG=1 to see the traceback instead.
"""

import argparse
import os
import sys
from typing import Callable, Optional

from .processor import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one InputError line instead of usage lines and exit code 2."""

    def error(self, message: str):
        raise InputError(f"{message} (see --help)")


def command(build_parser: Callable[[], argparse.ArgumentParser],
            run_args: Callable[[argparse.Namespace], Optional[int]]) -> Callable[..., int]:
    """A command line's `main(argv=None) -> exit code`: parse, run, and bad input as one `error:` line and 1."""
    def main(argv=None) -> int:
        try:
            return run_args(build_parser().parse_args(argv)) or 0
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return main


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run `main` and exit with its code; InputError (bad input) -> `error: ...` and 1, Ctrl-C -> 130, any other
    exception (a bug) -> one line naming it and 2."""
    debug = os.environ.get("MLX_PALIGEMMA_DEBUG", "") not in ("", "0")
    try:
        code = main()
    except InputError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if debug:
            raise
        cause = " ".join(str(e).split())[:300]
        print(f"error: unexpected {type(e).__name__}: {cause} (MLX_PALIGEMMA_DEBUG=1 shows where)", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
