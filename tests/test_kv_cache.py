"""The engine's quantized KV buffers (kv_bits): the prefix still attends in full precision, later tokens read an
8-bit cache, token for token as with mlx-lm's QuantizedKVCache."""

import mlx.core as mx

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


class MlxLmQuantized:
    """mlx-lm's QuantizedKVCache (8 bits, groups of 32) for one layer, read back as mlx-lm's quantized attention
    reads it: the prefix, the whole first input, attends to itself in full precision; every later token attends
    to the dequantized cache."""

    def __init__(self):
        from mlx_lm.models.cache import QuantizedKVCache

        self.cache = QuantizedKVCache(group_size=32, bits=8)

    @property
    def offset(self) -> int:
        return self.cache.offset

    def update_and_fetch(self, k, v):
        prefix = self.cache.offset == 0
        cached = self.cache.update_and_fetch(k, v)
        if prefix:
            return k, v
        return tuple(mx.dequantize(*t, group_size=32, bits=8) for t in cached)


def test_engine_quantized_cache_equals_mlx_lm_quantized_cache():
    """The engine's quantized buffers hold what mlx-lm's QuantizedKVCache holds: the same tokens, alone or in a
    padded batch with rows joining."""
    from mlx.utils import tree_map_with_path

    from mlx_paligemma.generation.engine import Engine, Request
    from mlx_paligemma.generation.settings import check_settings

    mx.random.seed(1)
    model = head_dim_32_model()
    # Random normal weights everywhere (norms included) and a small embedding give varied greedy answers; the
    # default init lets the tied embedding repeat the last prompt token.
    scale = lambda path: 0.02 if "embed_tokens" in path else 0.3  # noqa: E731
    model.update(tree_map_with_path(lambda path, w: mx.random.normal(w.shape) * scale(path), model.parameters()))
    prompts = [[95] * 4 + [2, 10, 11, 12, 13, 5], [95] * 4 + [2, 20, 21, 5], [95] * 4 + [2, 30, 31, 32, 33, 34, 35, 5]]
    pixels = mx.random.normal((3, 28, 28, 3))
    features = model.encode_images(pixels)

    def reference(ids, f, n=12):
        cache = [MlxLmQuantized() for _ in model.layers]
        logits = model(mx.array([ids]), image_features=f[None], cache=cache)
        out = [int(mx.argmax(logits[0, -1]))]
        for _ in range(n - 1):
            out.append(int(mx.argmax(model(mx.array([[out[-1]]]), cache=cache)[0, -1])))
        return out

    expected = [reference(ids, features[i]) for i, ids in enumerate(prompts)]
    engine = Engine(model, batch_size=2, kv_bits=8)
    uids = [engine.add(Request(ids, image_features=features[i : i + 1], settings=check_settings(max_tokens=12 - 3 * i),
                               stop_at_eos=False))
            for i, ids in enumerate(prompts)]
    tokens = {}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                tokens.setdefault(out.uid, []).append(out.token)
    assert len({tuple(t) for t in expected}) == 3
    for i, uid in enumerate(uids):
        assert tokens[uid] == expected[i][: 12 - 3 * i]

