"""Find a checkpoint (folder or hub id), read its config, map its weight names, load it lazily.

Accepted folders: original Hugging Face checkpoints (every published weight layout), folders written by
our convert.py, and MLX folders written by mlx-vlm (mlx-community's paligemma* repos).
"""

import dataclasses
import glob
import json
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .language import TextConfig
from .model import ModelConfig, PaliGemma
from .processor import InputError, PaliGemmaProcessor
from .vision import VisionConfig

# Files a checkpoint needs; everything else in a hub repo (original .npz, gguf, ...) is skipped.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.md"]


def get_model_path(path_or_repo: str) -> Path:
    """A local folder, or a hub repo downloaded (with a progress bar) to the huggingface_hub cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise InputError(f"model folder not found: {path_or_repo}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as e:
        raise InputError(f"cannot get {path_or_repo} from the Hugging Face hub: {str(e).splitlines()[0]}") from None


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


def load_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"no config.json in {path}: not a model folder")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file} is not valid JSON: {e}") from None
    if config.get("model_type") != "paligemma":
        raise InputError(f"unknown model type {config.get('model_type')!r} in {file}: expected 'paligemma'")
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", "gemma")
    if text["model_type"] not in ("gemma", "gemma2"):
        raise InputError(f"unknown text model type {text['model_type']!r} in {file}: expected 'gemma' or 'gemma2'")
    # Newer transformers nest rope_theta in rope_parameters.
    rope = text.get("rope_parameters") or {}
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    if text["model_type"] == "gemma2":
        text = {**_GEMMA2_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    text.setdefault("vocab_size", config.get("vocab_size", 257216))
    return ModelConfig(
        text_config=TextConfig(**_fields(TextConfig, text)),
        vision_config=VisionConfig(**_fields(VisionConfig, config.get("vision_config") or {})),
        image_token_index=config.get("image_token_index", config.get("image_token_id", 257152)),
        eos_token_id=config.get("eos_token_id", 1),
        quantization=config.get("quantization"),
    )


# transformers' Gemma2Config defaults, for configs that leave them out.
_GEMMA2_DEFAULTS = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)


def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The one map from every published weight name to ours (`vision_tower.vision_model.*`,
    `multi_modal_projector.linear.*`, `language_model.model.*`)."""
    out = {}
    for name, w in weights.items():
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith("language_model.") and not name.startswith("language_model.model."):
            name = "language_model.model." + name[len("language_model."):]
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        if name.endswith("position_ids") or name.endswith("lm_head.weight") or ".vision_model.head." in name:
            continue  # a buffer, the head tied to the embedding, SigLIP's pooling head PaliGemma does not use
        if name.endswith("patch_embedding.weight") and w.shape[1] == 3 and w.shape[-1] != 3:
            w = w.transpose(0, 2, 3, 1)  # PyTorch OIHW -> MLX OHWI
        out[name] = w
    return out


def check_safetensors(file: str) -> None:
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


def load_weights(path: Path) -> Dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise InputError(f"no .safetensors weights in {path}")
    weights = {}
    for file in files:
        check_safetensors(file)
        weights.update(mx.load(file))  # memory-mapped: nothing is read until used
    return weights


def dequantize(weights: Dict[str, mx.array], quantization: dict) -> Dict[str, mx.array]:
    out = dict(weights)
    for name in [k[: -len(".scales")] for k in weights if k.endswith(".scales")]:
        out[f"{name}.weight"] = mx.dequantize(
            out.pop(f"{name}.weight"), out.pop(f"{name}.scales"), out.pop(f"{name}.biases", None),
            group_size=quantization["group_size"], bits=quantization["bits"],
        )
    return out


def build_model(config: ModelConfig, weights: Dict[str, mx.array], path: Path) -> PaliGemma:
    model = PaliGemma(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                    class_predicate=lambda name, m: f"{name}.scales" in weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise InputError(f"weights in {path} do not match its config.json: {' '.join(str(e).split())[:300]}") from None
    return model


def load(path_or_repo: str, dtype: Optional[mx.Dtype] = None, lazy: bool = False,
         adapter_path: Optional[str] = None) -> Tuple[PaliGemma, PaliGemmaProcessor]:
    """Model and processor from a folder or hub id. Weights keep their stored dtype and quantization unless
    `dtype` is given, except on MLX's CPU backend, whose half-precision and quantized kernels are many times
    slower than its float32 BLAS: there, by default, weights are upcast or dequantized to float32, which
    computes the same model (dequantized values are exactly what the quantized kernels use) at twice or more
    the memory. Pass a dtype to keep them as stored. `adapter_path`: a folder of LoRA adapters written by
    mlx_paligemma.lora, applied to the model."""
    path = get_model_path(path_or_repo)
    config = load_config(path)
    weights = sanitize(load_weights(path))
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
        if config.quantization:
            weights = dequantize(weights, config.quantization)
            config.quantization = None
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = build_model(config, weights, path)
    if adapter_path is not None:
        from .lora import apply_adapters

        apply_adapters(model, adapter_path)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, PaliGemmaProcessor.from_pretrained(path, config)
