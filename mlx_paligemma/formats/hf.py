"""Our model -> a transformers checkpoint folder, in the layout of the published PaliGemma repos: weight names
`vision_tower.vision_model.*`, `multi_modal_projector.linear.*`, `language_model.model.*` (which transformers 4.x
and 5.x both load), PyTorch's OIHW patch convolution, the head tied to the embedding, and a full config.json."""

from typing import Dict, Tuple

import mlx.core as mx

from ..models.language import GemmaModel
from ..models.paligemma import ModelConfig
from ..processing.processor import Tokenizer

TORCH_DTYPES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


def to_transformers(weights: Dict[str, mx.array], config: ModelConfig,
                    tokenizer: Tokenizer) -> Tuple[Dict[str, mx.array], dict]:
    """(weights by transformers' names, config.json) from float weights by our names. Our names are the
    published ones; only the patch convolution changes layout."""
    out = {}
    for name, w in weights.items():
        if name.endswith("patch_embedding.weight"):
            w = w.transpose(0, 3, 1, 2)  # MLX OHWI -> PyTorch OIHW
        out[name] = w
    dtype = TORCH_DTYPES[out["language_model.model.norm.weight"].dtype]
    return out, transformers_config(config, tokenizer, dtype)


def transformers_config(config: ModelConfig, tokenizer: Tokenizer, dtype: str) -> dict:
    t, v = config.text_config, config.vision_config
    text = dict(model_type=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size,
                rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
                rope_theta=t.rope_theta, hidden_activation="gelu_pytorch_tanh", torch_dtype=dtype)
    if t.is_gemma2:
        text.update(query_pre_attn_scalar=t.query_pre_attn_scalar, sliding_window=t.sliding_window,
                    attn_logit_softcapping=t.attn_logit_softcapping,
                    final_logit_softcapping=t.final_logit_softcapping,
                    layer_types=["sliding_attention" if GemmaModel.is_sliding(t, i) else "full_attention"
                                 for i in range(t.num_hidden_layers)])
    vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
                  num_image_tokens=v.num_patches, projection_dim=t.hidden_size, torch_dtype=dtype)
    return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                bos_token_id=tokenizer.bos_id, eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_id,
                image_token_index=config.image_token_index, hidden_size=t.hidden_size, projection_dim=t.hidden_size,
                vocab_size=t.vocab_size, tie_word_embeddings=True, torch_dtype=dtype, text_config=text,
                vision_config=vision)
