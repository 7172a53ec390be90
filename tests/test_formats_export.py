"""Export round trip: folders written by mlx_paligemma.export, loaded by transformers itself.

These tests need torch and transformers, which the package does not. Where they are missing this module defines no
tests at all (nothing is collected, so nothing counts as skipped or passed); CI runs it in its live-reference step,
after installing them, where an empty run would fail (pytest exits 5 when it collects nothing).
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, MODELS, images_of
from mlx_paligemma import lora
from mlx_paligemma.convert import convert
from mlx_paligemma.export import export, main

if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def transformers_logits(folder, case):
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
        processor = AutoProcessor.from_pretrained(folder)
        images = [[Image.open(f) for f in row] for row in images_of(case)]
        inputs = processor(images=images, text=case["text"], return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits.numpy(), inputs

    @pytest.mark.parametrize("name", MODELS)
    def test_exported_checkpoint_is_the_original_for_transformers(tmp_path, cases, name):
        out = export(str(FIXTURES / name), str(tmp_path / "hf"))
        for case in ("single", "two_images"):
            ours, inputs = transformers_logits(out, cases[case])
            original, original_inputs = transformers_logits(FIXTURES / name, cases[case])
            for key in original_inputs:  # AutoProcessor reads the exported files as it reads the original's
                assert torch.equal(inputs[key], original_inputs[key]), key
            np.testing.assert_allclose(ours, original, atol=1e-4, rtol=0)

    def test_quantized_model_exports_dequantized(tmp_path, cases, capsys):
        quantized = convert(str(FIXTURES / "paligemma2-tiny"), str(tmp_path / "q"), "float32", quantize_bits=8,
                            group_size=32)
        assert main(["--model", str(quantized), "--out", str(tmp_path / "hf")]) == 0
        assert "warning" in capsys.readouterr().err
        model, processor = mp.load(str(quantized))  # dequantized on the CPU: the values the 8-bit layers use
        batch = processor(images=images_of(cases["single"])[0], text=cases["single"]["text"][0])
        expected = np.array(model(batch["input_ids"], batch["pixel_values"]))
        np.testing.assert_allclose(transformers_logits(tmp_path / "hf", cases["single"])[0], expected, atol=1e-4)

    def test_lora_fused_model_exports_to_the_same_logits(tmp_path, cases):
        model, processor = mp.load(str(FIXTURES / "paligemma-tiny"), dtype=mx.float32)
        mx.random.seed(3)
        lora.add_lora(model, rank=4)
        for layer in model.layers:  # nonzero B: the adapters change the model
            for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
                proj.lora_b = 0.5 * mx.random.normal(proj.lora_b.shape)
        case = cases["single"]
        batch = processor(images=images_of(case)[0], text=case["text"][0])
        expected = np.array(model(batch["input_ids"], batch["pixel_values"]))
        fused = lora.save_fused(model, str(FIXTURES / "paligemma-tiny"), tmp_path / "fused")
        out = export(str(fused), str(tmp_path / "hf"))
        theirs = transformers_logits(out, case)[0]
        base = transformers_logits(FIXTURES / "paligemma-tiny", case)[0]
        assert np.abs(theirs - base).max() > 0.1  # the export carries the adapters
        np.testing.assert_allclose(theirs, expected, atol=1e-4, rtol=0)
