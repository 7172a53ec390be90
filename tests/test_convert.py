"""convert.py round trips: the written folders load and generate, say how they were made, and stay within a stated
distance of the float model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.convert import convert


def logits_of(model, processor, case):
    batch = processor(images=images_of(case)[0], text=case["text"][0])
    return np.array(model(batch["input_ids"], batch["pixel_values"]).astype(mx.float32))


# 4-bit affine in groups of 64 leaves a relative logit error (test_quant.relative_error) of 0.26 on paligemma-tiny and
# 0.24 on paligemma2-tiny against float32; the bound is test_quant's for 4 bits (see FLOAT_BOUNDS there for why).
FOUR_BIT_BOUND = 0.4


@pytest.mark.parametrize("dtype,bits,atol", [("float32", None, 0.0), ("bfloat16", None, 0.5), ("float32", 4, None)])
def test_convert_round_trip(tmp_path, model_name, loaded, reference, cases, dtype, bits, atol):
    out = tmp_path / "converted"
    convert(str(FIXTURES / model_name), str(out), dtype=dtype, quantize_bits=bits, group_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"], "no temporary folder left behind"
    model, processor = mp.load(str(out), dtype=mx.float32)  # a dtype keeps the quantization as stored
    config = json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    weight = model.language_model.model.layers[0].self_attn.q_proj
    if bits:
        assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
        assert isinstance(weight, nn.QuantizedLinear) and weight.bits == bits
        assert isinstance(model.language_model.model.embed_tokens, nn.QuantizedEmbedding)
        # The vision tower stays in float; its width (32) is not a multiple of the group size anyway.
        assert isinstance(model.vision_tower.vision_model.encoder.layers[0].mlp.fc1, nn.Linear)
        if mx.default_device() == mx.cpu:
            # The CPU default dequantizes to float32: the same model, computed with the float32 BLAS.
            dequantized, _ = mp.load(str(out))
            assert isinstance(dequantized.language_model.model.layers[0].self_attn.q_proj, nn.Linear)
            np.testing.assert_allclose(logits_of(dequantized, processor, cases["single"]),
                                       logits_of(model, processor, cases["single"]), atol=1e-4, rtol=0)
    else:
        stored = mx.load(str(out / "model.safetensors"))
        assert "quantization" not in config
        assert stored["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == getattr(mx, dtype)
    case = cases["single"]
    ours = logits_of(model, processor, case)
    assert np.isfinite(ours).all()
    if atol is not None:
        np.testing.assert_allclose(ours, logits_of(*loaded, case), atol=atol, rtol=0)
    else:
        float_ = logits_of(*loaded, case)
        error = np.sqrt(np.mean((ours - float_) ** 2) / np.mean((float_ - float_.mean(-1, keepdims=True)) ** 2))
        assert error <= FOUR_BIT_BOUND, f"relative error {error:.3f} against float"
    text = mp.generate(model, processor, images=images_of(case)[0][0], prompt=case["text"][0], max_tokens=5).text
    assert isinstance(text, str)
    if dtype == "float32" and not bits:
        ref = [int(t) for t in reference["single/generated"][0][:5] if int(t) != processor.tokenizer.eos_id]
        assert text == processor.decode(ref)


def test_convert_refuses_existing_output(tmp_path, model_name):
    (tmp_path / "out").mkdir()
    with pytest.raises(mp.InputError, match="already exists"):
        convert(str(FIXTURES / model_name), str(tmp_path / "out"))


def test_failed_convert_leaves_nothing(tmp_path, model_name):
    with pytest.raises(mp.InputError, match="unknown dtype"):
        convert(str(FIXTURES / model_name), str(tmp_path / "out"), dtype="int3")
    assert list(tmp_path.iterdir()) == []
