"""The image-feature cache: the vision tower runs once per image, however many questions are asked about it."""

import hashlib
from collections import OrderedDict
from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..models.paligemma import PaliGemma


class FeatureCache:
    """Image features by the image's pixels, so repeated questions about one image run the vision tower once.
    Features only, never a prompt's KV cache: image tokens attend to the prompt. Entries belong to the weights
    they were computed with and are dropped when the vision tower or the projector is given new weights."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: "OrderedDict[bytes, mx.array]" = OrderedDict()
        self.version: Optional[tuple] = None
        self.images_encoded = 0  # vision tower runs, per image, for tests and statistics

    def features(self, model: PaliGemma, pixel_values: List[np.ndarray], alone: bool = False) -> List[mx.array]:
        """Features of each image. `alone`: each image through the tower by itself (batch-invariant rows), kept
        apart from features computed in batches, whose rounding follows the batch."""
        from mlx.utils import tree_flatten

        weights = (model.vision_tower.parameters(), model.multi_modal_projector.parameters())
        version = tuple(id(w) for _, w in tree_flatten(weights))
        if version != self.version:
            self.entries.clear()
            self.version = version
        keys = [hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=16).digest() + (b"1" if alone else b"")
                for p in pixel_values]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        if missing:
            first = {k: p for k, p in zip(keys, pixel_values)}
            if alone:
                features = [model.encode_images(mx.array(first[k][None]))[0] for k in missing]
            else:
                features = model.encode_images(mx.array(np.stack([first[k] for k in missing])))
            self.images_encoded += len(missing)
            for k, f in zip(missing, features):
                self.entries[k] = f
        out = []
        for k in keys:
            self.entries.move_to_end(k)
            out.append(self.entries[k])
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out


def feature_cache(model: PaliGemma) -> FeatureCache:
    """The model's own feature cache, shared by every engine on it (generate, stream_generate, servers)."""
    cache = getattr(model, "_feature_cache", None)
    if cache is None:
        cache = FeatureCache()
        object.__setattr__(model, "_feature_cache", cache)  # a plain attribute, not a parameter
    return cache
