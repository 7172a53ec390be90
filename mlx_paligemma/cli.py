"""How every command line ends: one `error:` line and a non-zero exit code for bad input, never a traceback.

Set MLX_PALIGEMMA_DEBUG=1 to see the traceback instead.
"""

import argparse
import difflib
import os
import sys
from typing import Callable, List, Optional

from . import defaults
from .errors import InputError
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


# Flags people bring from transformers, mlx-lm and mlx-vlm, and ours for them (where a command has ours).
NEIGHBOURS = {"--max-new-tokens": "--max-tokens", "--max-length": "--max-tokens", "--do-sample": "--temperature",
              "--num-return-sequences": "--best-of", "--adapter-file": "--adapter-path", "--adapters": "--adapter-path",
              "--hf-model": "--model", "--model-path": "--model", "--images": "--image", "--out": "--output",
              "--save-dir": "--output", "--input-dir": "--data", "--dataset": "--data"}


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


def add_sampling_arguments(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The sampling options, the same on generate and batch."""
    p.add_argument("--temperature", "--temp", type=float, default=defaults.TEMPERATURE, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=defaults.TOP_P, help="nucleus sampling; 1 is off")
    p.add_argument("--top-k", type=int, default=defaults.TOP_K, help="sample among the k likeliest; 0 is off")
    p.add_argument("--min-p", type=float, default=defaults.MIN_P, help="drop tokens below min_p x the likeliest; "
                   "0 is off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1 for long answers that loop "
                   "(default: off)")
    p.add_argument("--repetition-context-size", type=int, default=defaults.REPETITION_CONTEXT_SIZE,
                   help="tokens the repetition penalty looks back on")
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def add_decoding_arguments(p: argparse.ArgumentParser, logprobs_help: str, constraint_note: str = "") -> None:
    """Beams, log-probabilities, determinism and structured output: the same options on generate and batch."""
    p.add_argument("--num-beams", type=int, default=defaults.NUM_BEAMS, help="beam search as transformers' "
                   "generate(num_beams=...); 1 is off")
    p.add_argument("--length-penalty", type=float, default=defaults.LENGTH_PENALTY,
                   help="beam search: a finished answer scores its log-probability / length ** this")
    p.add_argument("--best-of", type=int, default=defaults.BEST_OF, metavar="N", help="big_vision's best_of_n: "
                   "sample N answers (with --temperature; answer i seeded --seed + i) and keep the likeliest")
    p.add_argument("--logprobs", type=int, default=None, metavar="K", help=logprobs_help + " (default: off)")
    p.add_argument("--deterministic", action="store_true", help="batch-invariant decoding: each answer bitwise "
                   "what it is alone, whatever shares its decode steps (slower)")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", default=None, help="answers are JSON valid against "
                            f"this schema{constraint_note} (default: off)")
    constraint.add_argument("--regex", default=None, help="each whole answer matches this regular expression "
                            "(default: off)")
    constraint.add_argument("--choices", default=None, metavar="A,B,C", help="each answer is one of these "
                            "comma-separated strings (default: off)")
    constraint.add_argument("--constrain", action="store_true", help="detect/segment prompts: well-formed boxes "
                            "(and masks) whose labels are among the prompt's classes (default: off)")


def add_object_arguments(p: argparse.ArgumentParser) -> None:
    """Detect/segment answers as objects: the same options on generate and batch."""
    p.add_argument("--mask-decoder", metavar="PATH", help="vae-oid.npz or its safetensors copy, for segment "
                   "answers (default: big_vision's, downloaded once)")
    p.add_argument("--min-score", type=float, default=defaults.MIN_SCORE, help="leave out objects whose score (the "
                   "mean probability of their box and label tokens) is below this")
