"""The quantized KV cache: the prefix still attends in full precision, later tokens read an 8-bit cache."""

import mlx.core as mx
import numpy as np

from mlx_paligemma.language import TextConfig
from mlx_paligemma.model import ModelConfig, PaliGemma
from mlx_paligemma.vision import VisionConfig


def test_quantized_kv_cache_stays_close_to_the_full_one():
    mx.random.seed(0)
    # head_dim 32: mlx quantizes in groups of at least 32, more than the fixtures' head_dim of 16.
    text = TextConfig(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=96,
                      query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      sliding_window=8)
    model = PaliGemma(ModelConfig(text, VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14),
                                  image_token_index=95))
    ids = mx.array([[95] * 4 + [2, 10, 11, 12, 13, 14, 15, 16, 17, 5]])
    pixels = mx.random.normal((1, 28, 28, 3))
    steps = mx.array([[20]])

    def run(kv_bits):
        cache = model.make_cache(kv_bits, kv_group_size=32)
        prefix = model(ids, pixels, cache=cache)
        return prefix, model(steps, cache=cache), cache

    full_prefix, full_step, _ = run(None)
    q_prefix, q_step, cache = run(8)
    assert isinstance(cache[0].keys, tuple) and cache[0].keys[0].dtype == mx.uint32
    np.testing.assert_array_equal(np.array(q_prefix), np.array(full_prefix))  # the prefix is exact
    diff = np.abs(np.array(q_step) - np.array(full_step)).max()
    assert 0 < diff < 0.05
