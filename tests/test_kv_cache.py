"""The quantized KV cache: the prefix still attends in full precision, later tokens read an 8-bit cache."""

import mlx.core as mx
import numpy as np

from mlx_paligemma.models.language import TextConfig
from mlx_paligemma.models.paligemma import ModelConfig, PaliGemma
from mlx_paligemma.models.vision import VisionConfig


def head_dim_32_model() -> PaliGemma:
    """A small random Gemma 2 PaliGemma with head_dim 32: mlx quantizes in groups of at least 32, more than the
    fixtures' head_dim of 16. Image token 95, eos 1."""
    text = TextConfig(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=96,
                      query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      sliding_window=8)
    return PaliGemma(ModelConfig(text, VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14),
                                 image_token_index=95, eos_token_id=1))


def test_quantized_kv_cache_stays_close_to_the_full_one():
    mx.random.seed(0)
    model = head_dim_32_model()
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


def test_engine_quantized_cache_equals_mlx_lm_quantized_cache():
    """The engine's quantized buffers hold what mlx-lm's QuantizedKVCache holds: the same tokens, alone or in a
    padded batch with rows joining."""
    from mlx.utils import tree_map_with_path

    from mlx_paligemma.generation.engine import Engine, Request

    mx.random.seed(1)
    model = head_dim_32_model()
    # Random normal weights everywhere (norms included) and a small embedding give varied greedy answers; the
    # default init lets the tied embedding repeat the last prompt token.
    model.update(tree_map_with_path(lambda path, w: mx.random.normal(w.shape) * (0.02 if "embed_tokens" in path else 0.3),
                                    model.parameters()))
    prompts = [[95] * 4 + [2, 10, 11, 12, 13, 5], [95] * 4 + [2, 20, 21, 5], [95] * 4 + [2, 30, 31, 32, 33, 34, 35, 5]]
    pixels = mx.random.normal((3, 28, 28, 3))
    features = model.encode_images(pixels)

    def reference(ids, f, n=12):
        cache = model.make_cache(8, kv_group_size=32)
        logits = model(mx.array([ids]), image_features=f[None], cache=cache)
        out = [int(mx.argmax(logits[0, -1]))]
        for _ in range(n - 1):
            out.append(int(mx.argmax(model(mx.array([[out[-1]]]), cache=cache)[0, -1])))
        return out

    expected = [reference(ids, features[i]) for i, ids in enumerate(prompts)]
    engine = Engine(model, batch_size=2, kv_bits=8)
    uids = [engine.add(Request(ids, image_features=features[i : i + 1], max_tokens=12 - 3 * i, stop_at_eos=False))
            for i, ids in enumerate(prompts)]
    tokens = {}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                tokens.setdefault(out.uid, []).append(out.token)
    assert len({tuple(t) for t in expected}) == 3
    for i, uid in enumerate(uids):
        assert tokens[uid] == expected[i][: 12 - 3 * i]

