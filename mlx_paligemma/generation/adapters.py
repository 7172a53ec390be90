"""Adapters as rows: each request names the adapter it runs through (Request.adapter, None for the base), and the
engine hands every forward the adapter index of each of its rows (models.adapters), so rows of different adapters
share each prefill and each decode step.

Loading and unloading at run time go through here too: an adapter is refused unloading while a row, running or
waiting, uses it, and the compiled decode steps are dropped when the model's layers change.
"""

from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx

from ..errors import Conflict, InputError
from ..formats.adapters import load_adapter
from ..models.adapters import adapter_names, adapter_set, remove_adapter


def named_folders(given: Sequence[str], flag: str) -> Dict[str, str]:
    """{name: folder} from the command lines' repeated `--adapter NAME=PATH`; a malformed or repeated one is one
    line naming it."""
    found: Dict[str, str] = {}
    for text in given:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} {text}: give NAME=PATH")
        if name in found:
            raise InputError(f"{flag} {text}: the name {name!r} is given twice")
        found[name] = path
    return found


def check_adapter(model, name: Optional[str]) -> None:
    """One line for a name that is not a loaded adapter (None, the base, is always there)."""
    if name is None:
        return
    found = adapter_set(model)
    if found is None or not found.info:
        raise InputError(f"unknown adapter {name!r}: this model has no adapters loaded")
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
    if hasattr(model, "_decode_steps"):
        model._decode_steps.clear()


def load_at_run_time(engine, name: str, folder) -> dict:
    """Load an adapter beside a running engine's base (between its steps). Returns what it is (load_adapter)."""
    info = load_adapter(engine.model, name, folder)
    mx.eval(engine.model.parameters())
    _changed(engine.model)
    return info


def unload_at_run_time(engine, name: str) -> None:
    """Unload an adapter no row uses; one in use, or unknown, is one line and nothing changes."""
    if name not in adapter_names(engine.model):
        check_adapter(engine.model, name)
    if in_use(engine, name):
        raise Conflict(f"adapter {name!r} is in use by a running or waiting request: try again when it ends")
    remove_adapter(engine.model, name)
    _changed(engine.model)
