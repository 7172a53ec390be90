"""The image-feature cache: the vision tower runs once per image, however many questions are asked about it."""

import hashlib
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .kept import kept
from ..models.paligemma import PaliGemma


class FeatureCache:
    """Image features by the image's pixels, so repeated questions about one image run the vision tower once.
    Features only, never a prompt's KV cache: image tokens attend to the prompt. Each image goes through the tower
    by itself, so its features are the same whatever else is encoded (rows stay batch-invariant) and one image's
    encoding is one bounded piece of a prefill. Entries belong to the weights they were computed with and are
    dropped when the vision tower or the projector is given new weights."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: "OrderedDict[bytes, mx.array]" = OrderedDict()
        self.version: Optional[tuple] = None
        self.images_encoded = 0  # vision tower runs, per image, for tests and statistics

    def lookup(self, model: PaliGemma, pixel_values: List[np.ndarray]) -> Tuple[List[bytes], Dict[bytes, mx.array]]:
        """Each image's key, and the features already known by key."""
        from mlx.utils import tree_flatten

        weights = (model.vision_tower.parameters(), model.multi_modal_projector.parameters())
        version = tuple(id(w) for _, w in tree_flatten(weights))
        if version != self.version:
            self.entries.clear()
            self.version = version
        keys = [hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=16).digest() for p in pixel_values]
        known = {}
        for k in keys:
            if k in self.entries:
                self.entries.move_to_end(k)
                known[k] = self.entries[k]
        return keys, known

    def encode(self, model: PaliGemma, key: bytes, pixels: np.ndarray) -> mx.array:
        """One image's features (T, D), kept under its key."""
        features = model.encode_images(mx.array(pixels[None]))[0]
        self.images_encoded += 1
        self.entries[key] = features
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return features


def feature_cache(model: PaliGemma) -> FeatureCache:
    """The model's feature cache, shared by every engine on it (generate, stream_generate, servers)."""
    return kept(model).setdefault("features", FeatureCache())
