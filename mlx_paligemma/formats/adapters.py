"""LoRA adapter folders in mlx-lm's layout: `adapters.safetensors` (the LoRA weights only) and
`adapter_config.json` (rank, scale, adapted layers, and whatever else the trainer records). One folder is applied
to the model (apply_adapters), or several are loaded beside its base, unfused, each chosen per row (load_adapters).

Every folder comes in through one admission, read_adapter, whichever way it comes (load(adapter_path=...) and
load(adapters=...), the commands' --adapter-path and --adapter NAME=PATH, the server's /v1/adapters): its name
from a safe set of characters, its path bounded, its two files regular files opened inside the root without
following a link out of it (the server's --adapter-root), its config's fields of their types, its safetensors header
whole (accepted float dtypes, each shape its byte span, keys in the layout), its rank and bytes within
limits.LIMITS, its factors finite. Each refusal is one InputError line whose `param` names the field.
"""

import json
import math
import os
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import limits
from ..errors import InputError, cause
from ..limits import MAX_ADAPTER_PATH_CHARS, MAX_JSON_FILE_BYTES
from ..models.adapters import MAX_ADAPTERS, add_adapter, check_name, factor_path
from .atomic import atomic_file

ADAPTER_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"
DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}  # the weights' dtypes we accept
KINDS = ("lora", "dora", "full")  # fine_tune_type of a folder applied alone; beside the base, lora only


class OutsideRoot(InputError):
    """A folder, or a file of it, outside the root adapters are loaded from: the server's 403."""


@dataclass
class Adapter:
    """A folder admitted: where it is (resolved), its config, and its weights, read and checked."""

    folder: Path
    config: dict
    weights: Dict[str, mx.array]


def save_adapters(model: nn.Module, folder, config: dict) -> None:
    """The model's trainable parameters and `config`, each file written beside its place and renamed into it,
    so a run killed mid-write leaves the previous adapters whole."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write adapters to {folder}: {e.strerror or e}") from None
    with atomic_file(folder / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.trainable_parameters())))
    with atomic_file(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def shown(text) -> str:
    """A path or key as a message names it: a very long one cut short."""
    text = str(text)
    return text if len(text) <= 200 else text[:200] + "..."


def adapter_folder(given, root: Optional[Path] = None, what: str = "adapter folder ") -> Path:
    """The folder `given` names, resolved (links and ..): a path of at most MAX_ADAPTER_PATH_CHARS, inside `root`
    when there is one (relative to it, or absolute; the root resolved by the caller, so it may itself be a link),
    and a folder. `what` begins the messages (a command's flag)."""
    given = os.fspath(given) if isinstance(given, os.PathLike) else given
    if not isinstance(given, str) or not given or "\0" in given:
        raise InputError(f"an adapter's path must be the name of its folder, got {reprlib.repr(given)}", param="path")
    if len(given) > MAX_ADAPTER_PATH_CHARS:
        raise InputError(f"an adapter's path is at most {MAX_ADAPTER_PATH_CHARS} characters, got {len(given)}",
                         param="path")
    try:
        folder = (root / given if root is not None else Path(given)).resolve()
        is_folder = folder.is_dir()
    except (OSError, RuntimeError) as e:  # RuntimeError: a loop of links
        raise InputError(f"{what}{shown(given)}: {getattr(e, 'strerror', None) or cause(e)}",
                         param="path") from None
    if root is not None and folder != root and root not in folder.parents:
        raise OutsideRoot(f"{shown(given)} is outside the adapter root this server loads from", param="path")
    if not is_folder:
        raise InputError(f"{what}{shown(given)}: no such folder", param="path")
    return folder


def _open(folder: Path, name: str, root: Optional[Path]):
    """A file of the folder, read-only, a regular file: its path resolved (inside the root when there is one) and
    opened without following a link (a link put in its place since is refused, not followed)."""
    try:
        real = (folder / name).resolve()
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot read {shown(folder / name)}: {getattr(e, 'strerror', None) or cause(e)}",
                         param="path") from None
    if root is not None and root not in real.parents:
        raise OutsideRoot(f"{shown(folder / name)} is a link out of the adapter root this server loads from",
                          param="path")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"no {name} in adapter folder {shown(folder)}", param="path") from None
    except OSError as e:
        raise InputError(f"cannot read {shown(folder / name)}: {e.strerror or e}", param="path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"cannot read {shown(folder / name)}: not a regular file", param="path")
    return os.fdopen(fd, "rb")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(rank, where: str) -> None:
    limit = limits.LIMITS.max_adapter_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"{where}: a LoRA rank is a whole number of at least 1, got {reprlib.repr(rank)}",
                         param="rank")
    if rank > limit:
        raise InputError(f"{where}: rank {rank}, more than the limit of {limit} (max_adapter_rank)", param="rank")


def _config(f, file: Path, beside: bool) -> dict:
    """adapter_config.json, its fields of the types mlx-lm's loading takes."""
    data = f.read(MAX_JSON_FILE_BYTES + 1)
    if len(data) > MAX_JSON_FILE_BYTES:
        raise InputError(f"{shown(file)} is more than {MAX_JSON_FILE_BYTES} bytes", param="config")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{shown(file)} is not valid JSON: {cause(e)}", param="config") from None
    if not isinstance(config, dict):
        raise InputError(f"{shown(file)} is not a JSON object", param="config")
    kind = config.get("fine_tune_type", "lora")
    if beside and kind != "lora":
        raise InputError(f"{shown(file.parent)} holds {reprlib.repr(kind)} weights, not LoRA adapters: load it alone "
                         "with adapter_path=", param="config")
    if kind not in KINDS:
        raise InputError(f"{shown(file)}: fine_tune_type {reprlib.repr(kind)} is none of {', '.join(KINDS)}",
                         param="config")
    num_layers = config.get("num_layers", -1)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise InputError(f"{shown(file)}: num_layers must be a whole number, got {reprlib.repr(num_layers)}",
                         param="config")
    if kind == "full":
        return config
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise InputError(f"{shown(file)}: lora_parameters must be an object (rank, scale, ...), got "
                         f"{reprlib.repr(params)}", param="config")
    if not _number(params.get("scale")):
        raise InputError(f"{shown(file)}: lora_parameters.scale must be a finite number, got "
                         f"{reprlib.repr(params.get('scale'))}", param="scale")
    if "rank" in params or not beside:  # applied alone, the rank makes the layers the factors go in
        _check_rank(params.get("rank"), f"{shown(file)}: lora_parameters.rank")
    dropout = params.get("dropout", 0.0)
    if not _number(dropout) or not 0 <= dropout < 1:
        raise InputError(f"{shown(file)}: lora_parameters.dropout must be a number in [0, 1), got "
                         f"{reprlib.repr(dropout)}", param="config")
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise InputError(f"{shown(file)}: lora_parameters.keys must be a list of layer names, got "
                         f"{reprlib.repr(keys)}", param="config")
    return config


def _header(f, size: int, file: Path) -> Dict[str, tuple]:
    """key -> (dtype, shape, bytes) of a safetensors header, every entry whole: an accepted dtype, a shape of whole
    numbers, and offsets within the file spanning exactly the shape's bytes."""
    def damaged(why: str) -> InputError:
        return InputError(f"weights file {shown(file)} is damaged: {why}", param="weights")

    raw = f.read(8)
    if len(raw) < 8:
        raise damaged("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, MAX_JSON_FILE_BYTES):
        raise damaged(f"its header's length ({length} bytes) runs past the file")
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise damaged("unreadable safetensors header")
    data, found = size - 8 - length, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        if entry.get("dtype") not in DTYPES:
            raise InputError(f"{shown(file)}: {shown(key)} is of dtype {reprlib.repr(entry.get('dtype'))}; adapters "
                             f"are of {', '.join(DTYPES)}", param="weights")
        dtype, shape, offsets = DTYPES[entry["dtype"]], entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape + offsets)):
            raise damaged(f"{shown(key)} has no shape and data_offsets of whole numbers")
        if not offsets[0] <= offsets[1] <= data:
            raise damaged(f"{shown(key)}'s data_offsets {offsets} run past the file's {data} bytes of data")
        nbytes = math.prod(shape) * dtype.size
        if offsets[1] - offsets[0] != nbytes:
            raise damaged(f"{shown(key)} of shape {shape} takes {nbytes} bytes, its data_offsets span "
                          f"{offsets[1] - offsets[0]}")
        found[key] = (dtype, tuple(shape), nbytes)
    return found


def _weights(f, file: Path, kind: str, beside: bool, replaces: Optional[dict]) -> Dict[str, mx.array]:
    """adapters.safetensors: its header checked (keys in the layout, ranks and bytes within the limits) before a
    byte of data is read, then its tensors, which must be finite."""
    header = _header(f, os.fstat(f.fileno()).st_size, file)
    leaves = ("lora_a", "lora_b", "m") if kind == "dora" else ("lora_a", "lora_b")
    for key, (_, shape, _) in header.items():
        if kind == "full":  # the model's own parameters, replaced
            if replaces is not None and (key not in replaces or tuple(replaces[key].shape) != shape):
                raise InputError(f"{shown(key)} of shape {shape} is not a parameter of this model", param="weights")
            continue
        if beside:
            factor_path(key)
        leaf = key.rpartition(".")[2]
        if leaf not in leaves:
            raise InputError(f"{shown(key)} is not a {kind} factor ({', '.join(leaves)})", param="weights")
        if leaf != "m":
            if len(shape) != 2:
                raise InputError(f"{shown(key)}: a LoRA factor is a matrix, got shape {shape}", param="weights")
            _check_rank(shape[1] if leaf == "lora_a" else shape[0], shown(key))
    total, limit = sum(n for *_, n in header.values()), limits.LIMITS.max_adapter_bytes
    if kind != "full" and total > limit:
        raise InputError(f"{shown(file)}: its factors are {total} bytes, more than the limit of {limit} "
                         "(max_adapter_bytes)", param="bytes")
    f.seek(0)
    try:
        weights = mx.load(f, format="safetensors")
    except (ValueError, RuntimeError) as e:
        raise InputError(f"cannot read {shown(file)}: {cause(e)}", param="weights") from None
    if {k: (w.dtype, tuple(w.shape)) for k, w in weights.items()} != {k: h[:2] for k, h in header.items()}:
        raise InputError(f"{shown(file)} changed while it was read", param="weights")
    finite = mx.stack([mx.isfinite(w).all() for w in weights.values()]).tolist() if weights else []
    for key, ok in zip(weights, finite):
        if not ok:
            raise InputError(f"{shown(key)} holds values that are not finite (NaN or infinite)", param="weights")
    return weights


def read_adapter(given, name: Optional[str] = None, root: Optional[Path] = None, reserved: Iterable[str] = (),
                 replaces: Optional[dict] = None) -> Adapter:
    """The one admission of an adapter folder (the module's docstring says what it checks). `name`: its name when
    it is loaded beside the base (LoRA factors of the decoder's linears only); None: applied to the model alone
    (LoRA, DoRA or full weights; full ones must be parameters of `replaces`, the model's, of their shapes).
    `root`: the resolved folder it and its files must lie inside; `reserved`: names it may not take."""
    if name is not None:
        check_name(name, reserved)
    folder = adapter_folder(given, root)
    with _open(folder, CONFIG_FILE, root) as f:
        config = _config(f, folder / CONFIG_FILE, beside=name is not None)
    with _open(folder, ADAPTER_FILE, root) as f:
        weights = _weights(f, folder / ADAPTER_FILE, config.get("fine_tune_type", "lora"), name is not None, replaces)
    return Adapter(folder, config, weights)


def apply_adapters(model: nn.Module, folder) -> nn.Module:
    """Apply a folder's adapters to the model as mlx-lm's load_adapters does (its LoRA or DoRA layers on the
    linears the config names, or full weights replacing the model's), once read_adapter has admitted it."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    adapter = read_adapter(folder, replaces=dict(tree_flatten(model.parameters())))
    config, kind = adapter.config, adapter.config.get("fine_tune_type", "lora")
    if kind != "full":
        p = config["lora_parameters"]
        lora = {"rank": p["rank"], "scale": p["scale"], "dropout": p.get("dropout", 0.0), "keys": p.get("keys")}
        try:
            linear_to_lora_layers(model, config.get("num_layers", -1), lora, use_dora=kind == "dora")
        except ValueError as e:  # a key naming a layer that is no linear
            raise InputError(f"{shown(adapter.folder / CONFIG_FILE)}: {cause(e)}", param="config") from None
    params = dict(tree_flatten(model.parameters()))
    for key, w in adapter.weights.items():
        if key not in params or params[key].shape != w.shape:
            raise InputError(f"adapters in {shown(adapter.folder)} do not fit this model: {shown(key)} of shape "
                             f"{tuple(w.shape)} is not one of its {kind} parameters", param="weights")
    model.load_weights(list(adapter.weights.items()), strict=False)
    return model


def load_adapter(model: nn.Module, name: str, adapter: Adapter) -> dict:
    """Load an admitted adapter (read_adapter) beside the model's base under `name`, unfused, for rows that choose
    it (models.adapters). Returns what it is: rank, scale, layers, bytes, and its folder."""
    info = add_adapter(model, name, adapter.weights, adapter.config["lora_parameters"]["scale"])
    info["path"] = str(adapter.folder)
    return info


def load_adapters(model: nn.Module, adapters) -> dict:
    """{name: folder} loaded beside the model's base (read_adapter, then load_adapter, each); the mapping and its
    names are checked before the first folder is read. Returns {name: what it is}."""
    if not isinstance(adapters, dict):
        raise InputError(f"adapters must be a dict of name -> folder, got {type(adapters).__name__}",
                         param="adapters")
    if len(adapters) > MAX_ADAPTERS:
        raise InputError(f"at most {MAX_ADAPTERS} adapters beside one base, got {len(adapters)}", param="adapters")
    for name in adapters:
        check_name(name)
    loaded = {}
    for name, folder in adapters.items():
        try:
            loaded[name] = load_adapter(model, name, read_adapter(folder, name))
        except InputError as e:
            raise type(e)(f"adapter {name!r}: {e}", e.param) from None  # a Conflict stays one
    return loaded
