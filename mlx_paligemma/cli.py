"""How every command line ends: one `error:` line and a non-zero exit code for bad input, never a traceback.

Set MLX_PALIGEMMA_DEBUG=1 to see the traceback instead.
"""

import argparse
import difflib
import os
import sys
from typing import Callable, List, Optional

from .errors import InputError
from .generation.settings import CONSTRAINTS, NEIGHBOURS as SETTING_NEIGHBOURS, SETTINGS
from .extras import VERSION


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds `(default: X)` to an option's help unless the help already states its default (says "default" or ends
    in a parenthesis), the option is a flag that is off, or it has no default (the help says what none means)."""

    def _get_help_string(self, action):
        help = action.help or ""
        said = "default" in help.lower() or help.rstrip().endswith(")")
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if said or unset or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def _flag(meant: str) -> str:
    """max_tokens -> --max-tokens; include_eos=False -> --no-include-eos."""
    name, _, value = meant.partition("=")
    return ("--no-" if value == "False" else "--") + name.replace("_", "-")


# Flags people bring from transformers, mlx-lm and mlx-vlm, and ours for them (where a command has ours): the
# settings' other names from the table, and the rest.
NEIGHBOURS = {_flag(name): _flag(meant) for name, meant in SETTING_NEIGHBOURS.items()}
NEIGHBOURS.update({"--num-return-sequences": "--best-of", "--adapter-file": "--adapter-path",
                   "--adapters": "--adapter-path", "--hf-model": "--model", "--model-path": "--model",
                   "--images": "--image", "--out": "--output", "--save-dir": "--output", "--input-dir": "--data",
                   "--dataset": "--data"})


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default shown in --help, the usage line naming the command as it is typed
    (`python -m mlx_paligemma.generate`, or the `mlx-paligemma-generate` console script), `--version`, no
    abbreviated flags (a mistyped `--adapter` is an error, not `--adapter-path`), an unknown flag answered with the
    likeliest one meant, and a bad option reported as one InputError line instead of usage lines and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", command_name(sys._getframe(1).f_globals.get("__spec__")))
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line())

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(unknown, self.flags())}")
        return args

    def flags(self) -> List[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def error(self, message: str):
        raise InputError(f"{message} (see --help)")


def version_line() -> str:
    """What `--version` prints, on every command and on `python -m mlx_paligemma`: the installed package's version."""
    return f"mlx-paligemma {VERSION}"


def did_you_mean(unknown: List[str], flags: List[str]) -> str:
    """` (did you mean --max-tokens?)` for the first unknown flag that resembles one of `flags`, else ``."""
    for word in unknown:
        name = word.split("=", 1)[0].replace("_", "-")
        if not name.startswith("-"):
            continue
        name = "--" + name.lstrip("-")
        meant = NEIGHBOURS.get(name) if NEIGHBOURS.get(name) in flags else None
        meant = meant or next(iter(difflib.get_close_matches(name, flags, n=1, cutoff=0.6)), None)
        if meant:
            return f" (did you mean {meant}?)"
    return ""


def plural(n: int, word: str) -> str:
    """`1 error`, `2 errors`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def command_name(spec) -> Optional[str]:
    """How the user ran the command whose parser is being built: a console script by its own name, else
    `python -m` and the module (argparse alone would say `generate.py` or `__main__.py`)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith("mlx-paligemma-"):
        return script
    if spec is None or not spec.name.startswith("mlx_paligemma."):
        return None
    return "python -m " + spec.name.removesuffix(".__main__")


def command(build_parser: Callable[[], argparse.ArgumentParser],
            run_args: Callable[[argparse.Namespace], Optional[int]]) -> Callable[..., int]:
    """A command line's `main(argv=None) -> exit code`: parse, run, and bad input as one `error:` line and 1."""
    def main(argv=None) -> int:
        try:
            return run_args(build_parser().parse_args(argv)) or 0
        except InputError as e:
            print(f"error: {message(e)}", file=sys.stderr)
            return 1

    return main


def message(e: InputError) -> str:
    """An error's line as a command line says it: its hint naming a flag where the Python one names a keyword."""
    return getattr(e, "on_command_line", None) or str(e)


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run `main` and exit with its code; InputError (bad input) -> `error: ...` and 1, Ctrl-C -> 130, any other
    exception (a bug) -> one line naming it and 2."""
    debug = os.environ.get("MLX_PALIGEMMA_DEBUG", "") not in ("", "0")
    try:
        code = main()
    except InputError as e:
        if debug:
            raise
        print(f"error: {message(e)}", file=sys.stderr)
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


def _early_stopping(text: str):
    words = {"true": True, "false": False, "never": "never"}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"give true, false or never, got {text!r}")
    return words[text.lower()]


def _strings(text: str) -> List[str]:
    return text.split(",")


def _at_least_one(text: str) -> int:
    if not text.strip().lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def add_settings(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of `command`'s settings, made from the one table (generation/settings.py): --name-with-dashes,
    its help and its default."""
    group = p.add_argument_group("generation settings", "the same names on every command, in Python and on the "
                                 "server (docs/PYTHON.md)")
    constraints = None
    for s in SETTINGS:
        if command not in s.commands:
            continue
        if s.name in CONSTRAINTS:  # one at most
            constraints = constraints or group.add_mutually_exclusive_group()
        g = constraints if s.name in CONSTRAINTS else group
        more = dict(help=f"{s.help} (default: {s.shown_default})", default=s.default, metavar=s.metavar)
        if s.type is bool:
            more.pop("metavar")
            # On by default: --include-eos / --no-include-eos.
            action = argparse.BooleanOptionalAction if s.default else "store_true"
            g.add_argument(s.flag, *s.flags, action=action, **more)
        elif s.name == "stop":
            g.add_argument(s.flag, *s.flags, action="append", **dict(more, default=None))
        else:
            kind = {"early_stopping": _early_stopping, "choices": _strings, "batch_size": _at_least_one}.get(s.name,
                                                                                                          s.type)
            g.add_argument(s.flag, *s.flags, type=str if kind is object else kind,
                           choices=[4, 8] if s.name == "kv_bits" else None, **more)


def settings_of(args: argparse.Namespace, command: str, request: bool = True) -> dict:
    """The values of `command`'s flags for the table's request settings (`request`), or for its settings of a whole
    run; the constraints are left to constraints.cli_constraint, which reads their files."""
    return {s.name: (tuple(getattr(args, s.name) or ()) if s.name == "stop" else getattr(args, s.name))
            for s in SETTINGS if command in s.commands and s.request == request and s.name not in CONSTRAINTS}


def changed(args: argparse.Namespace, command: str) -> List[str]:
    """The flags of `command`'s settings given a value other than their default, in the table's order."""
    return [s.flag for s in SETTINGS if command in s.commands and settings_of(args, command, s.request).get(
        s.name, getattr(args, s.name)) not in (s.default, None if s.default == () else s.default)]


def add_object_arguments(p: argparse.ArgumentParser) -> None:
    """Detect/segment answers as objects: the same option on generate and batch."""
    p.add_argument("--mask-decoder", metavar="PATH", help="vae-oid.npz or its safetensors copy, for segment "
                   "answers (default: big_vision's, downloaded once)")
