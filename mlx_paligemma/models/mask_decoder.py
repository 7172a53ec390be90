"""PaliGemma's mask decoder: the VQ-VAE that turns 16 `<segNNN>` codes into a 64x64 mask.

The architecture and the weight names follow Google's published `vae-oid.npz` (a PyTorch state dict, decoded in
big_vision/evaluators/proj/paligemma/transfers/segmentation.py). The module's own parameter names are the PyTorch
ones (`decoder.N`, with ReLUs holding the odd places, as in the original nn.Sequential), so converting is a matter of
kernel layouts: Conv2d OIHW -> OHWI, ConvTranspose2d IOHW -> OHWI, and `_vq_vae._embedding` -> `embedding.weight`.
"""

from typing import Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image


NUM_CODES, CODE_DIM = 128, 512


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(dim, dim, 1)]

    def __call__(self, x):
        y = x
        for layer in self.net:
            y = layer(y)
        return x + y


class MaskDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(NUM_CODES, CODE_DIM)
        # Kernel 4, stride 2, PyTorch padding 1 (big_vision's Flax padding 2 with transpose_kernel, the same operation):
        # each doubles the grid, 4 -> 8 -> 16 -> 32 -> 64.
        up = [layer for i, o in [(128, 128), (128, 64), (64, 32), (32, 16)]
              for layer in (nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), nn.ReLU())]
        self.decoder = [nn.Conv2d(CODE_DIM, 128, 1), nn.ReLU(), ResBlock(128), ResBlock(128), *up, nn.Conv2d(16, 1, 1)]

    def __call__(self, codes: mx.array) -> mx.array:
        """(N, 16) codes in 0..127 -> (N, 64, 64) masks, roughly in [-1, 1] (inside the object > 0)."""
        # The 16 codes are a 4x4 grid in row-major order, as big_vision's encoder flattens it.
        x = self.embedding(codes).reshape(codes.shape[0], 4, 4, CODE_DIM)
        for layer in self.decoder:
            x = layer(x)
        return x[..., 0]

    def decode(self, codes: Sequence[int]) -> np.ndarray:
        """One object's 16 codes -> its (64, 64) float32 mask."""
        return np.array(self(mx.array(np.asarray(codes, np.int32).reshape(1, 16)))[0])


def pixel_box(box) -> Tuple[int, int, int, int]:
    """Float pixel box -> the integer pixel rows/columns it covers, truncated as big_vision's evaluator does."""
    return tuple(int(v) for v in box)


def paste_mask(mask64: np.ndarray, box, image_size: Tuple[int, int]) -> np.ndarray:
    """A 64x64 decoder output -> a bool (height, width) mask of the whole image, True inside the object.

    Like big_vision's evaluator: bilinear resize (PIL, float) of the raw output to the box, then threshold at 0.
    """
    width, height = image_size
    x0, y0, x1, y1 = pixel_box(box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    mask = np.zeros((height, width), bool)
    if x1 > x0 and y1 > y0:
        resized = Image.fromarray(np.asarray(mask64, np.float32)).resize((x1 - x0, y1 - y0), Image.BILINEAR)
        mask[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return mask


