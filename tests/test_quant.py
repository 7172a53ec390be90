"""Every quantization an MLX folder records loads: folders written by mlx-lm's own quantization and save code
(mixed recipes with per-layer entries, mxfp4/nvfp4/mxfp8, 2-8 bits) give the logits of mlx-lm's quantized model,
on the quantized path and on the CPU dequantize path; convert writes each option, within a stated distance of the
float model per bit width; weights are found by name."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.convert import convert, main
from mlx_paligemma.formats.mlx import SIDE_FILES

FOLDERS = {  # name: quantize_model options
    "mixed_4_6": dict(group_size=64, bits=4, recipe="mixed_4_6"),
    "mixed_2_6": dict(group_size=32, bits=2, recipe="mixed_2_6"),
    "mxfp4": dict(group_size=None, bits=None, mode="mxfp4"),
    "nvfp4": dict(group_size=None, bits=None, mode="nvfp4"),
    "mxfp8": dict(group_size=None, bits=None, mode="mxfp8"),
    "2bit": dict(group_size=32, bits=2),
    "3bit": dict(group_size=64, bits=3),
    "6bit": dict(group_size=64, bits=6),
}


def assert_same_model(dequantized: np.ndarray, quantized: np.ndarray, mode: str) -> None:
    """The CPU dequantize path against the quantized one: the same weight values, exactly. Affine: float32 both,
    so within float32 rounding. The float modes keep uint8 scales, so their QuantizedEmbedding returns bfloat16
    rows where the dequantized model's are float32; the residual stream is float32 in both (language.py), so they
    differ by little more than those rows' rounding: relative_error (below) measured 0.0013-0.0018 here (0.015-0.021
    when the stream took the rows' bfloat16); bound 0.005."""
    if mode == "affine":
        np.testing.assert_allclose(dequantized, quantized, atol=1e-4, rtol=0)
    else:
        assert relative_error(quantized, dequantized) <= 0.005, relative_error(quantized, dequantized)


def relative_error(quantized: np.ndarray, float_: np.ndarray) -> float:
    """RMS of the logits' error over the RMS spread of the float logits across the vocabulary."""
    spread = float_ - float_.mean(axis=-1, keepdims=True)
    return float(np.sqrt(np.mean((quantized - float_) ** 2) / np.mean(spread ** 2)))


# The most relative_error convert's options may leave against the float model, on the tiny models' "single" case.
# Measured (paligemma-tiny / paligemma2-tiny): affine 2 bits (groups of 32) 0.80 / 0.89, 3 bits 0.52 / 0.64,
# 4 bits 0.26 / 0.24, 5 bits 0.14 / 0.14, 6 bits 0.069 / 0.060, 8 bits 0.017 / 0.015; mxfp4 0.47 / 0.32 (0.67 /
# 0.44 with the vision tower too), nvfp4 0.27 / 0.27, mxfp8 0.072 / 0.087, mixed_3_6 (mostly 3 bits) 0.49 / 0.62.
# The error halves with each bit, as a quantizer's step does. It is large at low widths because these models are
# 64 wide: one group spans a whole row of random weights, and every layer's rounding adds up. Bounds: about 1.5x
# the measured error. At 2 and 3 bits they only say the logits still follow the float model's (logits unrelated
# to it score about 1.4); from 4 bits on a wrong scale, group or bit layout would exceed them many times over.
FLOAT_BOUNDS = {("affine", 2): 1.25, ("affine", 3): 0.95, ("affine", 4): 0.4, ("affine", 5): 0.21,
                ("affine", 6): 0.1, ("affine", 8): 0.03, ("mxfp4", 4): 0.7, ("nvfp4", 4): 0.4, ("mxfp8", 8): 0.13}
VISION_TOO = 1.5  # the vision tower quantized as well: its rounding comes on top


def logits_of(model, processor, case):
    batch = processor(images=images_of(case)[0], text=case["text"][0])
    return np.array(model(batch["input_ids"], batch["pixel_values"]).astype(mx.float32))


def write_with_mlx_lm(source, out, group_size, bits, mode="affine", recipe=None):
    """Quantize with mlx-lm's quantize_model (its recipe for the decoder, the vision linears where the group size
    divides them) and
    write with its save_model/save_config, as mlx-community folders are made. Returns mlx-lm's model."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, _ = mp.load(str(source), dtype=mx.float32)
    mixed = mixed_quant_predicate_builder(recipe, model, group_size) if recipe else None

    def predicate(path, module):  # the recipe on the decoder; the vision tower's linears (not its embeddings)
        if not path.startswith("language_model."):
            return isinstance(module, nn.Linear)
        return mixed(path, module) if mixed else True

    config = json.loads((source / "config.json").read_text())
    model, config = quantize_model(model, config, group_size, bits, mode=mode, quant_predicate=predicate)
    save_model(out, model)
    save_config(config, out / "config.json", keep_vision_config=True)
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return model


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_mlx_lm_quantized_folders_load(tmp_path, model_name, cases, kind):
    out = tmp_path / kind
    theirs = write_with_mlx_lm(FIXTURES / model_name, out, **FOLDERS[kind])
    config = json.loads((out / "config.json").read_text())
    if "recipe" in FOLDERS[kind]:
        assert any(isinstance(v, dict) for v in config["quantization"].values()), "per-layer entries"
    ours, processor = mp.load(str(out), dtype=mx.float32)  # a dtype keeps the quantization
    modes = {m.mode for _, m in ours.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert modes == {FOLDERS[kind].get("mode", "affine")}
    if "recipe" in FOLDERS[kind]:
        assert len({m.bits for _, m in ours.named_modules() if isinstance(m, nn.QuantizedLinear)}) == 2
    expected = logits_of(theirs, processor, cases["single"])
    np.testing.assert_array_equal(logits_of(ours, processor, cases["single"]), expected)
    if mx.default_device() == mx.cpu:
        dequantized, _ = mp.load(str(out))  # the CPU default: every layer dequantized with its own settings
        assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                       for _, m in dequantized.named_modules())
        assert_same_model(logits_of(dequantized, processor, cases["single"]), expected,
                          FOLDERS[kind].get("mode", "affine"))


@pytest.mark.parametrize("options", [
    dict(quantize_bits=2, group_size=32), dict(quantize_bits=3), dict(quantize_bits=5), dict(quantize_bits=6),
    dict(quantize_bits=4, q_mode="mxfp4"), dict(quantize_bits=4, q_mode="nvfp4"), dict(quantize_bits=8, q_mode="mxfp8"),
    dict(quantize_bits=4, quant_predicate="mixed_3_6"), dict(quantize_bits=4, q_mode="mxfp4", quantize_vision=True),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_convert_round_trips(tmp_path, cases, options):
    out = convert(str(FIXTURES / "paligemma2-tiny"), str(tmp_path / "q"), "float32", **options)
    block = json.loads((out / "config.json").read_text())["quantization"]
    mode = options.get("q_mode", "affine")
    assert block["mode"] == mode and block["bits"] == options["quantize_bits"]
    model, processor = mp.load(str(out), dtype=mx.float32)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert layers and all(m.mode == mode for m in layers.values())
    assert any(n.startswith("vision_tower") for n in layers) == options.get("quantize_vision", False)
    if "quant_predicate" in options:  # mlx-lm's recipe: 3 bits, 6 for some v_proj/down_proj, each listed
        assert {m.bits for m in layers.values()} == {3, 6}
        assert all(block[name]["bits"] == m.bits for name, m in layers.items())
    quantized = logits_of(model, processor, cases["single"])
    dequantized = logits_of(mp.load(str(out))[0], processor, cases["single"])
    assert_same_model(dequantized, quantized, mode)
    # Against the float model: a recipe is bounded by its most common width (mixed_3_6: 3 bits).
    float_model, _ = mp.load(str(FIXTURES / "paligemma2-tiny"), dtype=mx.float32)
    bits = 3 if options.get("quant_predicate") == "mixed_3_6" else options["quantize_bits"]
    bound = FLOAT_BOUNDS[mode, bits] * (VISION_TOO if options.get("quantize_vision") else 1)
    error = relative_error(quantized, logits_of(float_model, processor, cases["single"]))
    assert error <= bound, f"{options}: relative error {error:.3f} against float, bound {bound}"


def test_cli_quantization_options(tmp_path, capsys):
    source = str(FIXTURES / "paligemma-tiny")
    assert main(["--hf-path", source, "--mlx-path", str(tmp_path / "a"), "-q", "--q-mode", "mxfp4"]) == 0
    block = json.loads((tmp_path / "a" / "config.json").read_text())["quantization"]
    assert block == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert main(["--hf-path", source, "--mlx-path", str(tmp_path / "b"), "-q", "--q-bits", "3",
                 "--quant-predicate", "mixed_3_4", "--q-group-size", "32"]) == 0
    assert main(["--hf-path", source, "--mlx-path", str(tmp_path / "c"), "-q", "--q-mode", "mxfp4",
                 "--q-bits", "8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mode mxfp4 quantizes 4 bits in groups of 32" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_layer_that_cannot_load_is_named(tmp_path):
    out = convert(str(FIXTURES / "paligemma-tiny"), str(tmp_path / "q"), "float32", quantize_bits=4)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["language_model.model.layers.1.mlp.up_proj"] = {"group_size": 64, "bits": 4, "mode": "xx"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(mp.InputError) as e:
        mp.load(str(out))
    message = str(e.value)
    assert "\n" not in message and "layer language_model.model.layers.1.mlp.up_proj" in message


def test_weights_are_found_by_the_checkpoint_names(tmp_path, cases):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "paligemma-tiny", folder)
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"lora_a": mx.zeros((2, 2))})  # a stray file
    model, processor = mp.load(str(folder))
    reference, _ = mp.load(str(FIXTURES / "paligemma-tiny"))
    np.testing.assert_array_equal(logits_of(model, processor, cases["single"]),
                                  logits_of(reference, processor, cases["single"]))
    # A sharded layout: the index names the files.
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = mx.load(str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}))
    mp.load(str(folder))
    (folder / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(mp.InputError, match="missing: model-00001-of-00001.safetensors"):
        mp.load(str(folder))


def test_revision_reaches_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def download(repo, revision=None, allow_patterns=None):
        seen.update(repo=repo, revision=revision, patterns=allow_patterns)
        return str(FIXTURES / "paligemma-tiny")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    mp.load("someone/paligemma-tiny", revision="v2")
    assert seen["revision"] == "v2" and "model*.safetensors" in seen["patterns"]
    convert("someone/paligemma-tiny", str(tmp_path / "out"), revision="abc123")
    assert seen["revision"] == "abc123"
