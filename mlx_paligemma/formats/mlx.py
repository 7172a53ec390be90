"""Model folders: Hugging Face checkpoints (every published weight layout) and MLX folders (ours, mlx-vlm's).

Reading: the folder or hub id, config.json, the weight-name map (`sanitize`), lazy weights, the quantization a
folder records (one setting or per-layer entries, every MLX mode). Writing: the MLX folder, atomically (atomic.py).
"""

import dataclasses
import json
import reprlib
import shutil
import struct
import typing
from pathlib import Path, PurePath
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..models.language import TextConfig
from ..models.paligemma import ModelConfig, PaliGemma
from ..errors import InputError, read_json_object
from ..models.vision import VisionConfig
from .atomic import atomic_folder

# Files a checkpoint needs; everything else in a hub repo (original .npz, gguf, ...) is skipped.
CHECKPOINT_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.md"]
# Tokenizer and processor files that travel with the weights.
SIDE_FILES = [
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.json",
]
MAX_SHARD_BYTES = 5 << 30
# MLX's quantization modes; the float modes allow exactly one (group size, bits) pair.
MODES = {"affine": None, "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)


def get_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder, or a hub repo (at `revision`: a branch, tag or commit) downloaded to the hub cache. A name
    that only a local path can be is never sent to the hub: a missing folder is reported as one."""
    name = str(path_or_repo)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{name} is a file, not a model folder")
    if local_only(name):
        raise InputError(f"local model folder not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as e:
        raise InputError(f"no local folder {name}, and the Hugging Face hub does not give it: "
                         f"{str(e).splitlines()[0]}") from None


def local_only(name: str) -> bool:
    """Whether `name` cannot be a hub id (`owner/name`): it starts as a path does (`.`, `/`, `~`), has other than
    two parts, or its parent is a folder here (`models/my-model` beside a `models` folder)."""
    return name.startswith((".", "/", "~")) or len(PurePath(name).parts) != 2 or Path(name).parent.is_dir()


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"no config.json in {path}: not a model folder")
    return read_json_object(file)


def _accepts(kind, value) -> bool:
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        return any(_accepts(k, value) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_accepts(typing.get_args(kind)[0], v) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return kind is type(None) and value is None or isinstance(value, kind)


def _fields(cls, d: dict, where: str) -> dict:
    """The dataclass's fields present in `d`, each checked against its declared type."""
    out = {}
    for f in dataclasses.fields(cls):
        if d.get(f.name) is not None:
            if not _accepts(f.type, d[f.name]):
                expected = getattr(f.type, "__name__", f.type)
                raise InputError(f"{where}: {f.name} is {reprlib.repr(d[f.name])}, expected {expected}")
            out[f.name] = d[f.name]
    return out


def _section(config: dict, key: str, file) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise InputError(f"{file}: {key} is {type(value).__name__}, expected an object")
    return dict(value)


# transformers' Gemma2Config defaults, for configs that leave them out.
_GEMMA2_DEFAULTS = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)


# The largest sizes a config may give: 100x the largest published PaliGemma's (the 28B: 46 decoder layers of 4608,
# MLP 36864, 32 heads of 128, a 257216 vocabulary; SigLIP So400m: 27 layers of 1152, MLP 4304, 16 heads; 896 px
# in 14 px patches, 4096 image tokens), so a damaged or hostile config fails here, before anything is allocated
# (a million layers would be a million Python modules long before any weight is read).
SIZE_LIMITS = {
    "text_config": dict(hidden_size=460800, intermediate_size=3686400, num_hidden_layers=4600,
                        num_attention_heads=3200, num_key_value_heads=3200, head_dim=25600, vocab_size=25721600,
                        max_position_embeddings=819200, sliding_window=819200),
    "vision_config": dict(hidden_size=115200, intermediate_size=430400, num_hidden_layers=2700,
                          num_attention_heads=1600, num_channels=300, image_size=89600, patch_size=1400),
}
MAX_IMAGE_TOKENS = 409600


def check_sizes(config: ModelConfig, file) -> None:
    """Every size positive and within SIZE_LIMITS, and the few relations the layers need, as one line naming the
    field."""
    for section, limits in SIZE_LIMITS.items():
        part = getattr(config, section)
        for name, limit in limits.items():
            value = getattr(part, name)
            if value is not None and not 1 <= value <= limit:
                raise InputError(f"{file}: {section}.{name} is {value}, expected 1 to {limit}")
        for name in ("rms_norm_eps", "layer_norm_eps", "rope_theta", "query_pre_attn_scalar"):
            value = getattr(part, name, None)
            if value is not None and not 0 < value < float("inf"):
                raise InputError(f"{file}: {section}.{name} is {value}, expected a positive number")
    t, v = config.text_config, config.vision_config
    if t.num_attention_heads % t.num_key_value_heads:
        raise InputError(f"{file}: text_config.num_attention_heads ({t.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({t.num_key_value_heads})")
    if v.hidden_size % v.num_attention_heads:
        raise InputError(f"{file}: vision_config.hidden_size ({v.hidden_size}) is not a multiple of "
                         f"num_attention_heads ({v.num_attention_heads})")
    if v.patch_size > v.image_size or v.num_patches > MAX_IMAGE_TOKENS:
        raise InputError(f"{file}: vision_config.image_size {v.image_size} in patches of {v.patch_size} gives "
                         f"{v.num_patches} image tokens, expected 1 to {MAX_IMAGE_TOKENS}")
    for name in ("image_token_index", "eos_token_id"):
        ids = getattr(config, name)
        if any(i < 0 for i in (ids if isinstance(ids, list) else [ids])):
            raise InputError(f"{file}: {name} is {ids}, expected token ids >= 0")


def parse_config(config: dict, file) -> ModelConfig:
    """Our ModelConfig from a transformers- or MLX-style config.json, every field type-checked and every size
    checked (check_sizes): the one config reader of load, convert, export and the big_vision import."""
    if config.get("model_type") != "paligemma":
        raise InputError(f"unknown model type {reprlib.repr(config.get('model_type'))} in {file}: expected 'paligemma'")
    text = _section(config, "text_config", file)
    text.setdefault("model_type", "gemma")
    if text["model_type"] not in ("gemma", "gemma2"):
        raise InputError(f"unknown text model type {reprlib.repr(text['model_type'])} in {file}: "
                         "expected 'gemma' or 'gemma2'")
    # Newer transformers nest rope_theta in rope_parameters.
    rope = _section(text, "rope_parameters", f"{file}: text_config")
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    if text["model_type"] == "gemma2":
        text = {**_GEMMA2_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    text.setdefault("vocab_size", config.get("vocab_size", 257216))
    top = _fields(_TopLevel, {**config, "image_token_index": config.get("image_token_index",
                                                                         config.get("image_token_id"))}, file)
    model_config = ModelConfig(
        text_config=TextConfig(**_fields(TextConfig, text, f"{file}: text_config")),
        vision_config=VisionConfig(**_fields(VisionConfig, _section(config, "vision_config", file),
                                             f"{file}: vision_config")),
        image_token_index=top.get("image_token_index", 257152),
        eos_token_id=top.get("eos_token_id", 1),
        quantization=top.get("quantization"),
    )
    check_sizes(model_config, file)
    return model_config


@dataclasses.dataclass
class _TopLevel:  # the top-level fields we read, with their types
    image_token_index: int = 257152
    eos_token_id: typing.Union[int, List[int]] = 1
    quantization: Optional[dict] = None


def load_config(path: Path) -> ModelConfig:
    return parse_config(read_config(path), path / "config.json")


def rename(name: str) -> Optional[str]:
    """The one map from a published weight or module name to ours (`vision_tower.vision_model.*`,
    `multi_modal_projector.linear.*`, `language_model.model.*`); None for what PaliGemma does not use."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("language_model.") and not name.startswith("language_model.model."):
        name = "language_model.model." + name[len("language_model."):]
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]
    if name.endswith("position_ids") or "lm_head" in name.split(".") or ".vision_model.head." in name:
        return None  # a buffer, the head tied to the embedding, SigLIP's pooling head PaliGemma does not use
    return name


def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Every published weight layout -> our names and layouts."""
    out = {}
    for name, w in weights.items():
        name = rename(name)
        if name is None:
            continue
        if name.endswith("patch_embedding.weight") and w.shape[1] == 3 and w.shape[-1] != 3:
            w = w.transpose(0, 2, 3, 1)  # PyTorch OIHW -> MLX OHWI
        out[name] = w
    return out


def check_safetensors(file: Path) -> None:
    """Fail with one line on a truncated or damaged file, before MLX reads it."""
    size = Path(file).stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except Exception:
        raise InputError(f"weights file {file} is damaged: unreadable safetensors header") from None
    if 8 + header_len + end > size:
        raise InputError(f"weights file {file} is truncated: {size} bytes, the header needs {8 + header_len + end}")


def weight_files(path: Path) -> List[Path]:
    """The checkpoint's own weight files: those its index names, else model*.safetensors (so adapters or other
    safetensors in the folder are not taken for weights)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no weight_map object")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index} names weight files that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise InputError(f"no model*.safetensors weights in {path}")
    return files


def load_weights(path: Path) -> Dict[str, mx.array]:
    """Our names -> arrays, memory-mapped: nothing is read until used."""
    weights = {}
    for file in weight_files(path):
        check_safetensors(file)
        weights.update(mx.load(str(file)))
    return sanitize(weights)


def quantize_as_stored(model: nn.Module, quantization: dict, weights: Dict[str, mx.array], where) -> None:
    """Quantize the layers the weights hold quantized, each with its own entry of the config's quantization
    block (mlx-lm's rule: mixed recipes list layers, a plain block gives the defaults) or, where no entry names
    the layer, the settings its packed shapes imply (mlx-lm's `infer_quant_config`)."""
    from mlx_lm.utils import infer_quant_config

    entries = {rename(k): v for k, v in quantization.items() if isinstance(v, (dict, bool))}
    current = [None]

    def predicate(path, module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        current[0] = path
        entry = entries.get(path)
        if isinstance(entry, dict):
            return dict(entry)  # nn.quantize may edit it
        if entry is not None:
            return entry
        return infer_quant_config(path, module, weights)

    try:
        nn.quantize(model, group_size=quantization.get("group_size"), bits=quantization.get("bits"),
                    mode=quantization.get("mode", "affine"), class_predicate=predicate)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: cannot load layer {current[0]} as quantized: {' '.join(str(e).split())}") from None


def build_model(config: ModelConfig, weights: Dict[str, mx.array], where) -> PaliGemma:
    """The model with `weights` loaded (strictly), quantized as they are stored."""
    model = PaliGemma(config)
    if config.quantization:
        quantize_as_stored(model, config.quantization, weights, where)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise InputError(f"weights in {where} do not match its config.json: {' '.join(str(e).split())[:300]}") from None
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Every quantized layer back to floats with its own bits, group size and mode (mlx-lm's dequantize_model)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(model)


def check_quantization(bits: Optional[int], group_size: Optional[int], mode: str = "affine",
                       recipe: Optional[str] = None) -> tuple:
    """(group_size, bits) to quantize with, the mode's defaults filled in, or one line saying what is wrong."""
    from mlx_lm.convert import QUANT_RECIPES

    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}: choose from {', '.join(MODES)}")
    if recipe is not None and recipe not in QUANT_RECIPES:
        raise InputError(f"unknown quantization recipe {recipe!r}: choose from {', '.join(QUANT_RECIPES)}")
    if recipe is not None and mode != "affine":
        raise InputError(f"the {recipe} recipe mixes affine bit widths: it does not combine with mode {mode}")
    if MODES[mode] is not None:
        fixed = MODES[mode]
        if (group_size or fixed[0], bits or fixed[1]) != fixed:
            raise InputError(f"mode {mode} quantizes {fixed[1]} bits in groups of {fixed[0]}, "
                             f"not {bits} bits in groups of {group_size}")
        return fixed
    if (bits or 4) not in AFFINE_BITS:
        raise InputError(f"{bits}-bit quantization is not supported: choose from {AFFINE_BITS}")
    if (group_size or 64) not in (32, 64, 128):
        raise InputError(f"group size {group_size} is not supported: choose from 32, 64, 128")
    return group_size or 64, bits or 4


def quantize(model: PaliGemma, group_size: Optional[int] = 64, bits: Optional[int] = 4, vision: bool = False,
             mode: str = "affine", recipe: Optional[str] = None) -> dict:
    """Quantize the decoder's linears and tied embedding (and, if asked, the vision tower's and projector's linears),
    skipping layers whose input width the group size does not divide. `recipe` is one of mlx-lm's mixed_*
    predicates for the decoder (more bits for some v_proj/down_proj layers). Returns the quantization block
    for config.json: the defaults, plus the layer's own entry wherever the recipe chose."""
    group_size, bits = check_quantization(bits, group_size, mode, recipe)
    block = {"group_size": group_size, "bits": bits, "mode": mode}
    mixed = None
    if recipe is not None:
        from mlx_lm.convert import mixed_quant_predicate_builder

        mixed = mixed_quant_predicate_builder(recipe, model, group_size)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if not path.startswith("language_model."):
            return vision and isinstance(module, nn.Linear)  # the position embedding is added, not looked up
        if mixed is None:
            return True
        block[path] = mixed(path, module)
        return dict(block[path])

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    return block


def save_weights(folder: Path, weights: dict, metadata: Optional[dict] = None) -> None:
    """Weights in shards of at most 5 GB (`model.safetensors`, or `model-0000N-of-0000M.safetensors` and the
    index)."""
    shards, shard, size = [], {}, 0
    for name, w in weights.items():
        if shard and size + w.nbytes > MAX_SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = w
        size += w.nbytes
    shards.append(shard)
    index = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"[write] {file} ({sum(w.nbytes for w in shard.values()) / 1e9:.2f} GB)", flush=True)
        mx.save_safetensors(str(folder / file), shard, metadata=metadata or {"format": "mlx"})
        index.update({name: file for name in shard})
    if len(shards) > 1:
        total = sum(w.nbytes for w in weights.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )


def copy_side_files(source: Path, folder: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def write_folder(folder: Path, weights: dict, config: dict, source: Optional[Path] = None) -> None:
    """Weights, config.json and, from `source`, the tokenizer and processor files."""
    save_weights(folder, weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if source is not None:
        copy_side_files(source, folder)


def write_model_folder(out: Path, weights: dict, config: dict, source: Path) -> None:
    """`write_folder` into `out`, atomically (see atomic_folder)."""
    with atomic_folder(out) as tmp:
        write_folder(tmp, weights, config, source)


def upload(folder: Path, repo: str, tag: str) -> None:
    """A written folder to a hub repo (created if needed)."""
    from huggingface_hub import HfApi

    print(f"[{tag}] uploading to {repo}", flush=True)
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo)
