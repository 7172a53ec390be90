"""PaliGemma: SigLIP features, projected to the decoder's width, take the places of the `<image>` tokens."""

from dataclasses import dataclass, field
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .language import LanguageModel, TextConfig
from .vision import VisionConfig, VisionTower


@dataclass
class ModelConfig:
    text_config: TextConfig
    vision_config: VisionConfig
    image_token_index: int = 257152
    eos_token_id: int = 1
    model_type: str = "paligemma"
    quantization: Optional[dict] = field(default=None)

    @property
    def image_seq_length(self) -> int:
        return self.vision_config.num_patches


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LanguageModel(config.text_config)

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) pixels -> (N, image_seq_length, text hidden) features, in the decoder's dtype."""
        dtype = self.language_model.model.norm.weight.dtype
        pixel_values = pixel_values.astype(self.vision_tower.vision_model.post_layernorm.weight.dtype)
        return self.multi_modal_projector(self.vision_tower(pixel_values)).astype(dtype)

    def embed(self, input_ids: mx.array, image_features: Optional[mx.array] = None) -> mx.array:
        """Token embeddings with image features placed, in order, at the `<image>` tokens."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_index
        n_tokens = int(is_image.sum().item())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"the prompt has {n_tokens} <image> tokens but the images give {n_features} features "
                f"({image_features.shape[0]} images x {image_features.shape[1]}): one image per "
                f"{image_features.shape[1]} <image> tokens"
            )
        features = image_features.reshape(-1, embeds.shape[-1])
        index = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
        placed = features[index].reshape(embeds.shape)
        return mx.where(is_image[..., None], placed.astype(embeds.dtype), embeds)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        attention_mask: Optional[mx.array] = None,
        token_type_ids: Optional[mx.array] = None,
        cache: Optional[List[Any]] = None,
        image_features: Optional[mx.array] = None,
        logits_to_keep: int = 0,
    ) -> mx.array:
        """Logits (B, L, vocab) for `input_ids` (B, L), or (B, logits_to_keep, vocab) for the last positions.

        Without token_type_ids, a call on an empty cache treats every token as prefix (what the processor
        gives for a prompt without suffix) and a call on a filled cache treats every token as suffix (decoding).
        attention_mask (B, N) covers the cached tokens too; 0 marks left padding.
        """
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_features)
        if token_type_ids is not None:
            prefix = token_type_ids == 0
        elif cache is not None and cache[0].offset > 0:
            prefix = False
        else:
            prefix = None
        return self.language_model(embeds, cache, attention_mask, prefix, logits_to_keep)

    def make_cache(self) -> List[Any]:
        """mlx-lm's growing KV caches, one per layer, for calls of the model itself (the engine keeps its own:
        generation/kv_buffers.py). Sliding-window layers keep every key too: the prefix is attended to in full even
        when longer than the window, and the mask applies the window to later tokens."""
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.language_model.model.layers]

    @property
    def layers(self):
        # mlx-lm's LoRA and cache helpers look for `model.layers`.
        return self.language_model.model.layers


def suffix_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Next-token cross-entropy averaged over the suffix tokens of the batch (labels -100 elsewhere),
    computed in float32 as transformers does."""
    logits = logits[:, :-1].astype(mx.float32)
    targets = labels[:, 1:]
    valid = targets != -100
    losses = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0))
    return (losses * valid).sum() / valid.sum()
