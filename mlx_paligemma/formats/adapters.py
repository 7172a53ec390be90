"""LoRA adapter folders in mlx-lm's layout: `adapters.safetensors` (the LoRA weights only) and
`adapter_config.json` (rank, scale, adapted layers, and whatever else the trainer records). One folder is applied
to the model (apply_adapters), or several are loaded beside its base, unfused, each chosen per row (load_adapters)."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import InputError, read_json_object
from ..models.adapters import MAX_ADAPTERS, add_adapter
from .atomic import atomic_file
from .mlx import check_safetensors

ADAPTER_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"


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


def apply_adapters(model: nn.Module, folder) -> nn.Module:
    """Wrap the model's linears as the adapter config says and load the trained LoRA weights."""
    from mlx_lm.tuner.utils import load_adapters

    folder = Path(folder)
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise InputError(f"no {name} in adapter folder {folder}")
    read_json_object(folder / CONFIG_FILE)  # a damaged file is named here, not reported as a misfit
    check_safetensors(folder / ADAPTER_FILE)
    try:
        return load_adapters(model, str(folder))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"adapters in {folder} do not fit this model: {' '.join(str(e).split())[:300]}") from None


def read_lora(folder) -> tuple:
    """(weights, scale) of a folder of LoRA adapters, for loading beside others (models.adapters): its files
    checked, its config a LoRA one. A folder of full weights or DoRA is refused with one line."""
    folder = Path(folder)
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise InputError(f"no {name} in adapter folder {folder}")
    config = read_json_object(folder / CONFIG_FILE)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise InputError(f"{folder} holds {kind} weights, not LoRA adapters: load it alone with adapter_path=")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise InputError(f"{folder / CONFIG_FILE} has no lora_parameters.scale")
    check_safetensors(folder / ADAPTER_FILE)
    try:
        weights = mx.load(str(folder / ADAPTER_FILE))
    except (ValueError, RuntimeError) as e:
        raise InputError(f"cannot read {folder / ADAPTER_FILE}: {' '.join(str(e).split())[:200]}") from None
    return weights, params["scale"]


def load_adapter(model: nn.Module, name: str, folder) -> dict:
    """Load the LoRA adapters in `folder` beside the model's base under `name`, unfused, for rows that choose it
    (models.adapters). Returns what it is: rank, scale, layers, bytes, and its folder."""
    weights, scale = read_lora(folder)
    try:
        info = add_adapter(model, name, weights, scale)
    except InputError as e:
        raise type(e)(f"adapter {name!r} ({folder}): {e}", e.param) from None  # a Conflict stays one
    info["path"] = str(folder)
    return info


def load_adapters(model: nn.Module, adapters) -> dict:
    """{name: folder} loaded beside the model's base (load_adapter each); the whole mapping is checked (a dict of
    at most MAX_ADAPTERS names) before the first folder is read. Returns {name: what it is}."""
    if not isinstance(adapters, dict):
        raise InputError(f"adapters must be a dict of name -> folder, got {type(adapters).__name__}")
    if len(adapters) > MAX_ADAPTERS:
        raise InputError(f"at most {MAX_ADAPTERS} adapters beside one base, got {len(adapters)}")
    for name, folder in adapters.items():
        if not isinstance(folder, (str, Path)):
            raise InputError(f"adapter {name!r}: its folder must be a path, got {type(folder).__name__}")
    return {name: load_adapter(model, name, folder) for name, folder in adapters.items()}
