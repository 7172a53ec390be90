"""Model and processor from a folder or hub id, ready to run.

Accepted folders: original Hugging Face checkpoints (every published weight layout), folders written by our
convert.py, and MLX folders written by mlx-vlm or mlx-lm's code (mlx-community's paligemma* repos), with any
quantization they record. Reading the formats is `formats.mlx`'s job; this module puts the pieces together.
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..errors import InputError
from .adapters import apply_adapters, load_adapters
from .mlx import build_model, dequantize, get_model_path, load_config, load_weights
from ..models.paligemma import PaliGemma
from ..processing.processor import PaliGemmaProcessor


def load(path_or_repo: str, dtype: Optional[mx.Dtype] = None, lazy: bool = False,
         adapter_path: Optional[str] = None, revision: Optional[str] = None,
         adapters: Optional[Dict[str, str]] = None) -> Tuple[PaliGemma, PaliGemmaProcessor]:
    """Model and processor from a folder or hub id (`revision`: a hub branch, tag or commit). Weights keep their
    stored dtype and quantization unless `dtype` is given, except on MLX's CPU backend, whose half-precision and
    quantized kernels are many times slower than its float32 BLAS: there, by default, weights are upcast or
    dequantized to float32, which computes the same model (dequantized values are exactly what the quantized
    kernels use) at twice or more the memory. Pass a dtype to keep them as stored. `adapter_path`: a folder of
    LoRA adapters written by mlx_paligemma.lora, applied to the model. `adapters`: {name: folder} of several,
    loaded beside the base unfused, each chosen per request (`generate(..., adapter=name)`; docs/ADAPTERS.md)."""
    if adapters is not None and adapter_path is not None:
        raise InputError("give adapter_path (one adapter, applied to the model) or adapters (several, chosen per "
                         "request), not both")
    path = get_model_path(path_or_repo, revision)
    config = load_config(path)
    model = build_model(config, load_weights(path), path)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
        if config.quantization:
            dequantize(model)
            config.quantization = None
    if dtype is not None:
        model.set_dtype(dtype)
    if adapter_path is not None:
        apply_adapters(model, adapter_path)
    if adapters is not None:
        load_adapters(model, adapters)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, PaliGemmaProcessor.from_pretrained(path, config)
