"""LoRA adapter folders in mlx-lm's layout: `adapters.safetensors` (the LoRA weights only) and
`adapter_config.json` (rank, scale, adapted layers, and whatever else the trainer records)."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import InputError, read_json_object
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
