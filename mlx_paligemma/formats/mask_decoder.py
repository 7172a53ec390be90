"""The mask decoder's weights: Google's `vae-oid.npz` (a PyTorch state dict) or our `.safetensors` copy, and its
download on first use. The architecture is models/mask_decoder.py."""

import sys
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import InputError
from ..models.mask_decoder import MaskDecoder
from ..processing.fetch import fetch_chunks


VAE_OID_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"


VAE_OID_TIMEOUT = 1800.0  # seconds for the whole download (a few hundred MB on a slow link)


VAE_OID_MAX_BYTES = 2**30  # the file is far smaller: a cap, not a size check


CACHE_DIR = Path.home() / ".cache" / "mlx_paligemma"


def _from_torch(weights: dict, model: MaskDecoder) -> list:
    """vae-oid.npz names and layouts -> the module's; the encoder's weights are dropped."""
    modules = dict(model.named_modules())
    out = [("embedding.weight", weights["_vq_vae._embedding"])]
    for name, w in weights.items():
        if not name.startswith("decoder."):
            continue
        if w.ndim == 4:
            # PyTorch stores Conv2d as (out, in, h, w), ConvTranspose2d as (in, out, h, w); MLX wants (out, h, w, in).
            transposed = isinstance(modules[name.rsplit(".", 1)[0]], nn.ConvTranspose2d)
            w = w.transpose(1, 2, 3, 0) if transposed else w.transpose(0, 2, 3, 1)
        out.append((name, w))
    return out


def load_mask_decoder(path: Union[str, Path]) -> MaskDecoder:
    """Google's `vae-oid.npz`, or a `.safetensors` copy (ours from `save_mask_decoder`, or one with PyTorch names)."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                weights = {k: mx.array(f[k].astype(np.float32)) for k in f.files}
        else:
            weights = mx.load(str(path))
        model = MaskDecoder()
        pairs = _from_torch(weights, model) if "_vq_vae._embedding" in weights else list(weights.items())
        model.load_weights([(k, v.astype(mx.float32)) for k, v in pairs], strict=True)
    except Exception as e:  # numpy, zipfile and MLX raise many types for a missing or damaged file
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"cannot load the mask decoder {path}: {cause}") from None
    model.eval()
    return model


def save_mask_decoder(model: MaskDecoder, path: Union[str, Path]) -> None:
    """Write the decoder alone (MLX names and layouts, 4.8 MB of float32; the npz also holds the encoder)."""
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})


class NoMaskDecoder(InputError):
    """The mask decoder could not be downloaded: the message names the keyword that gives a local copy (Python),
    `on_command_line` the flag."""

    def __init__(self, reason):
        super().__init__(f"cannot download the mask decoder ({reason}); give a local copy with mask_decoder=PATH")
        self.on_command_line = (f"cannot download the mask decoder ({reason}); give a local copy with "
                                "--mask-decoder PATH")


def fetch_vae_oid(cache_dir: Union[str, Path] = CACHE_DIR) -> Path:
    """Path to vae-oid.npz, downloaded from big_vision's public bucket on first use."""
    path = Path(cache_dir) / "vae-oid.npz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as file:
            done = 0
            for chunk in fetch_chunks(VAE_OID_URL, timeout=VAE_OID_TIMEOUT, max_bytes=VAE_OID_MAX_BYTES, tell=True):
                file.write(chunk)
                done += len(chunk)
                print(f"\rdownloading {VAE_OID_URL}: {done / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
    except (InputError, OSError) as e:
        part.unlink(missing_ok=True)
        raise NoMaskDecoder(e if isinstance(e, InputError) else e.strerror) from None
    print(file=sys.stderr)  # ends the progress line
    part.replace(path)  # only a complete download takes the cached name
    return path
