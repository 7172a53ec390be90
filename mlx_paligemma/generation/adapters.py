"""Adapters as rows: each request names the adapter it runs through (Request.adapter, None for the base), and the
engine hands every forward the adapter index of each of its rows (models.adapters), so rows of different adapters
share each prefill and each decode step.

Loading and unloading at run time go through here too: an adapter is refused unloading while a row, running or
waiting, uses it, and the compiled decode steps are dropped when the model's layers change.
"""

import argparse
import reprlib
from typing import Dict, Iterable, List, Optional, Sequence, Union

import mlx.core as mx

from .. import limits
from ..errors import Conflict, InputError
from .kept import kept
from ..formats.adapters import Adapter, adapter_folder, load_adapter, shown
from ..models.adapters import adapter_names, adapter_set, check_name, remove_adapter


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-adapter-rank and --max-adapter-bytes (limits.py), on every command that loads adapters and the server;
    set_limits applies them."""
    def positive(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
        return int(text)

    d = limits.Limits()
    p.add_argument("--max-adapter-rank", type=positive, default=d.max_adapter_rank,
                   help="largest LoRA rank an adapter may have: every row of a batch pays it at each layer it adapts")
    p.add_argument("--max-adapter-bytes", type=positive, default=d.max_adapter_bytes,
                   help="bytes of an adapter's factors, and of the stacks of all adapters beside the base together, "
                        "each layer's padded to its largest rank")


def set_limits(args: argparse.Namespace) -> None:
    limits.configure(max_adapter_rank=args.max_adapter_rank, max_adapter_bytes=args.max_adapter_bytes)


def command_adapters(args: argparse.Namespace, reserved: Iterable[str] = ()) -> Dict[str, str]:
    """A command's adapter flags, checked before the model loads: the limits set (set_limits), --adapter-path's
    folder, and {name: folder} of the repeated --adapter NAME=PATH (named_folders; names none of `reserved`)."""
    set_limits(args)
    if getattr(args, "adapter_path", None) is not None:
        adapter_folder(args.adapter_path, what="--adapter-path ")
    return named_folders(getattr(args, "adapter", []), "--adapter", reserved)


def named_folders(given: Sequence[str], flag: str, reserved: Iterable[str] = ()) -> Dict[str, str]:
    """{name: folder} from the command lines' repeated `--adapter NAME=PATH`, each name and folder checked as the
    admission checks them (formats.adapters); a malformed or repeated one is one line naming it."""
    found: Dict[str, str] = {}
    for text in given:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} {shown(text)}: give NAME=PATH")
        try:
            check_name(name, reserved)
        except InputError as e:
            raise InputError(f"{flag} {shown(text)}: {e}", param="name") from None
        if name in found:
            raise InputError(f"{flag} {text}: the name {name!r} is given twice", param="name")
        found[name] = path
    for name, path in found.items():
        adapter_folder(path, what=f"{flag} {name}=")
    return found


def check_adapter(model, name: Optional[str]) -> None:
    """One line for a name that is not a loaded adapter (None, the base, is always there)."""
    if name is None:
        return
    found = adapter_set(model)
    if found is None or not found.info:
        raise InputError(f"unknown adapter {reprlib.repr(name)}: this model has no adapters loaded", param="adapter")
    found.index(name)


def adapter_ids(model, rows) -> mx.array:
    """(B,) int32: the adapter index of each engine row (-1: the base)."""
    found = adapter_set(model)
    if found is None:
        return mx.full((len(rows),), -1, dtype=mx.int32)
    return mx.array([found.index(r.request.settings.adapter) for r in rows], dtype=mx.int32)


def per_prompt(adapter: Union[None, str, Sequence[Optional[str]]], n: int) -> List[Optional[str]]:
    """batch_generate's `adapter`: one name (or None) for every prompt, or a list of one per prompt."""
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    if not isinstance(adapter, (list, tuple)) or len(adapter) != n or not all(
            a is None or isinstance(a, str) for a in adapter):
        raise InputError(f"adapter must be a name, None, or a list of one per prompt ({n})", param="adapter")
    return list(adapter)


def in_use(engine, name: str) -> bool:
    """Whether a row of the engine, waiting, prefilling or running, runs through adapter `name`."""
    return any(r.request.settings.adapter == name for r in engine.rows())


def _changed(model) -> None:
    # Compiled decode steps traced the old layers; the next step traces the new ones.
    kept(model).pop("decode_steps", None)


def load_at_run_time(engine, name: str, adapter: Adapter) -> dict:
    """Load an admitted adapter (formats.adapters.read_adapter) beside a running engine's base (between its steps).
    Returns what it is (load_adapter)."""
    info = load_adapter(engine.model, name, adapter)
    mx.eval(engine.model.parameters())
    _changed(engine.model)
    return info


def unload_at_run_time(engine, name: str) -> None:
    """Unload an adapter no row uses; one in use, or unknown, is one line and nothing changes."""
    if name not in adapter_names(engine.model):
        check_adapter(engine.model, name)
    if in_use(engine, name):
        raise Conflict(f"adapter {name!r} is in use by a running or waiting request: try again when it ends",
                       param="name")
    remove_adapter(engine.model, name)
    _changed(engine.model)
