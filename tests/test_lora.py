"""LoRA / QLoRA fine-tuning: transformers' loss, finite-difference gradients, learning, adapters, fusing, the CLI."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_paligemma as mp
from conftest import FIXTURES, MODELS, images_of
from mlx_paligemma import lora
from mlx_paligemma.training import trainer
from mlx_paligemma.convert import convert, quantize
from mlx_paligemma.errors import InputError
from mlx_paligemma.data.sources import read_training_sets

IMAGES = FIXTURES / "images"
# Two examples to memorise: different images, the same prompt, suffixes of different lengths.
TEACH = [("chelsea.jpg", "caption en", "a cat"), ("coffee.jpg", "caption en", "a cup of coffee")]


def fresh(model_name, quantized=False):
    """A model of its own (LoRA changes it in place), float32; 8-bit quantized for QLoRA."""
    model, processor = mp.load(str(FIXTURES / model_name), dtype=mx.float32)
    if quantized:
        quantize(model, group_size=32, bits=8)
    return model, processor


def write_data(folder, rows=TEACH):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": str(IMAGES / image), "prefix": prefix, "suffix": suffix})
             for image, prefix, suffix in rows]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def logits_of(model, batch):
    return model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"])


def test_training_loss_matches_transformers(model_name, reference, cases):
    model, processor = fresh(model_name)
    trainer.add_lora(model)  # LoRA B starts at zero: the adapted model is the base model
    case = cases["suffix"]
    texts = case["text"] * len(case["images"]) if len(case["text"]) == 1 else case["text"]
    examples = [trainer.Example(row[0], text, suffix) for row, text, suffix in zip(images_of(case), texts, case["suffix"])]
    batch = trainer.make_batch(processor, examples)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        np.testing.assert_array_equal(np.array(batch[key]), reference[f"suffix/{key}"], err_msg=key)
    labels = np.array(batch["labels"])
    assert len(set((labels != -100).sum(axis=1))) > 1 and not np.array(batch["attention_mask"]).all()
    loss, n_tokens = trainer.loss_fn(model, batch)
    assert abs(loss.item() - float(reference["suffix/loss"])) < 1e-4
    assert n_tokens.item() == (labels[:, 1:] != -100).sum()


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_lora_gradients_match_finite_differences(model_name, quantized):
    model, processor = fresh(model_name, quantized)
    mx.random.seed(1)
    trainer.add_lora(model, rank=4)
    batch = trainer.make_batch(processor, [trainer.Example(str(IMAGES / i), p, s) for i, p, s in TEACH])
    layers = [model.layers[0].mlp.down_proj, model.layers[-1].self_attn.q_proj]
    for layer in layers:
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)  # B = 0 would zero A's gradient
    (_, _), grads = nn.value_and_grad(model, trainer.loss_fn)(model, batch)
    grads = dict(tree_flatten(grads))
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in grads)
    names = ["language_model.model.layers.0.mlp.down_proj",
             f"language_model.model.layers.{len(model.layers) - 1}.self_attn.q_proj"]
    for layer, name in zip(layers, names):
        for leaf in ("lora_a", "lora_b"):
            p0, direction = getattr(layer, leaf), mx.random.normal(getattr(layer, leaf).shape)
            direction = direction / mx.linalg.norm(direction)  # a unit step: small enough for central differences

            def loss_at(t):
                setattr(layer, leaf, p0 + t * direction)
                return trainer.loss_fn(model, batch)[0].item()

            eps = 1e-2
            numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
            setattr(layer, leaf, p0)
            analytic = (grads[f"{name}.{leaf}"] * direction).sum().item()
            assert abs(numeric - analytic) <= 5e-3 * abs(analytic) + 2e-4, (name, leaf, numeric, analytic)


def test_gradient_checkpointing_gives_the_same_gradients(model_name):
    from mlx_paligemma.models.language import DecoderLayer

    model, processor = fresh(model_name)
    trainer.add_lora(model)
    model.layers[0].self_attn.v_proj.lora_b = mx.ones_like(model.layers[0].self_attn.v_proj.lora_b) * 0.01
    batch = trainer.make_batch(processor, [trainer.Example(str(IMAGES / i), p, s) for i, p, s in TEACH])
    plain = nn.value_and_grad(model, trainer.loss_fn)(model, batch)
    call = DecoderLayer.__call__
    try:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # what --grad-checkpoint does; it patches the class
        checked = nn.value_and_grad(model, trainer.loss_fn)(model, batch)
    finally:
        DecoderLayer.__call__ = call
    assert plain[0][0].item() == pytest.approx(checked[0][0].item(), abs=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(plain[1]), tree_flatten(checked[1])):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=k)


def test_choosing_the_adapted_layers(model_name):
    model, _ = fresh(model_name)
    assert trainer.lora_keys(["attention", "q_proj", "down_proj"]) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
    with pytest.raises(InputError, match="unknown LoRA layer 'qproj'"):
        trainer.lora_keys(["qproj"])
    config = trainer.add_lora(model, rank=2, layers=["q_proj", "v_proj"], num_layers=1)
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    last = len(model.layers) - 1
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    assert trainable == sorted(f"language_model.model.layers.{last}.self_attn.{p}.lora_{ab}"
                               for p in ("q_proj", "v_proj") for ab in "ab")


@pytest.fixture(scope="module", params=[(m, q) for m in MODELS for q in (False, True)],
                ids=[f"{m}-{q}" for m in MODELS for q in ("lora", "qlora")])
def trained(request, tmp_path_factory):
    """A tiny model (float or 8-bit base) after a few dozen steps on TEACH, its adapters saved."""
    name, quantized = request.param
    model, processor = fresh(name, quantized)
    mx.random.seed(0)
    config = trainer.add_lora(model, rank=8)
    folder = tmp_path_factory.mktemp("trained")
    data = read_training_sets(str(write_data(folder / "data")))
    args = trainer.TrainingArgs(iters=40, batch_size=2, learning_rate=1e-3, steps_per_report=10, steps_per_eval=20,
                             adapter_path=str(folder / "adapters"))
    history = trainer.train(model, processor, data["train"], data["valid"], args, adapter_config=config,
                         report=lambda s: None)
    base = folder / "base"  # the base model as a folder, for load(..., adapter_path) and fusing
    convert(str(FIXTURES / name), str(base), "float32", quantize_bits=8 if quantized else None, group_size=32)
    return dict(model=model, processor=processor, data=data, history=history, folder=folder, base=str(base),
                quantized=quantized)


def test_training_lowers_the_loss_and_teaches_the_suffix(trained):
    history, model, processor = trained["history"], trained["model"], trained["processor"]
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    assert train_losses[-1] < train_losses[0] - 0.2 and val_losses[-1] < val_losses[0] - 0.2
    assert all(h["steps_per_second"] > 0 and h["tokens_per_second"] > 0 and h["peak_memory"] > 0
               for h in history if "train_loss" in h)
    for example in trained["data"]["train"]:
        assert mp.generate(model, processor, example.image, example.prefix, max_tokens=8).text == example.suffix


def test_adapters_reload_and_fuse_to_the_same_logits(trained, tmp_path):
    model, processor, folder = trained["model"], trained["processor"], trained["folder"]
    batch = trainer.make_batch(processor, trained["data"]["valid"])
    expected = logits_of(model, batch)
    config = json.loads((folder / "adapters" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 8 and config["fine_tune_type"] == "lora"

    reloaded, _ = mp.load(trained["base"], dtype=mx.float32, adapter_path=str(folder / "adapters"))
    np.testing.assert_array_equal(np.array(logits_of(reloaded, batch)), np.array(expected))

    fused_path = lora.save_fused(reloaded, trained["base"], tmp_path / "fused", dequantize=True)
    fused, _ = mp.load(str(fused_path), dtype=mx.float32)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    np.testing.assert_allclose(np.array(logits_of(fused, batch)), np.array(expected), atol=1e-4)
    # A fused float model is an ordinary checkpoint: convert takes it.
    convert(str(fused_path), str(tmp_path / "fused-8bit"), "float32", quantize_bits=8, group_size=32)

    if trained["quantized"]:  # re-quantized with the base's settings
        again, _ = mp.load(trained["base"], dtype=mx.float32, adapter_path=str(folder / "adapters"))
        requantized, _ = mp.load(str(lora.save_fused(again, trained["base"], tmp_path / "requantized")),
                                 dtype=mx.float32)
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in requantized.named_modules())
        error = np.abs(np.array(logits_of(requantized, batch)) - np.array(expected))
        assert error.mean() < 0.02  # quantizing W + BA rounds to a new 8-bit grid
        for example in trained["data"]["train"]:
            assert mp.generate(requantized, processor, example.image, example.prefix, max_tokens=8).text == example.suffix


def test_cli_trains_saves_and_fuses(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    (data / "test.jsonl").write_text((data / "valid.jsonl").read_text())
    rc = lora.main(["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--iters", "4",
                    "--batch-size", "2", "--learning-rate", "1e-3", "--lora-layers", "attention", "--steps-per-report",
                    "2", "--steps-per-eval", "2", "--adapter-path", str(tmp_path / "adapters"), "--fuse",
                    "--save-path", str(tmp_path / "fused")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "2 train, 2 valid, 2 test examples" in out and "Iter 2: val loss" in out and "Test loss" in out
    assert "tokens/s" in out and "peak mem" in out and "Trainable parameters" in out
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
    mp.load(str(tmp_path / "fused"))
    # Fusing saved adapters on their own.
    rc = lora.main(["--model", str(FIXTURES / "paligemma2-tiny"), "--adapter-path", str(tmp_path / "adapters"),
                    "--fuse", "--save-path", str(tmp_path / "fused2")])
    assert rc == 0 and (tmp_path / "fused2" / "config.json").is_file()


@pytest.mark.parametrize("line, message", [
    ('{"image": "missing.jpg", "prefix": "caption en", "suffix": "a"}', "line 2: image not found: "),
    ('{"image": "chelsea.jpg", "prefix": "caption en"}', "line 2: 'suffix' is missing: nothing to learn"),
    ('{"image": "chelsea.jpg", ', "line 2: not valid JSON"),
])
def test_a_bad_line_stops_before_training(tmp_path, capsys, line, message):
    (tmp_path / "chelsea.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    good = json.dumps({"image": "chelsea.jpg", "prefix": "caption en", "suffix": "a cat"})  # relative to the file
    (tmp_path / "train.jsonl").write_text(good + "\n" + line + "\n")
    rc = lora.main(["--model", str(FIXTURES / "paligemma-tiny"), "--data", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1 and "Iter" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'train.jsonl'}, {message}")


def test_cli_full_fine_tuning_with_the_vision_tower_resumes_and_fuses(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    args = ["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--fine-tune-type", "full",
            "--train-vision", "--batch-size", "2", "--learning-rate", "1e-3", "--steps-per-report", "2",
            "--save-every", "2", "--adapter-path", str(tmp_path / "weights")]
    assert lora.main(args + ["--iters", "2"]) == 0
    assert lora.main(args + ["--iters", "4", "--resume", "--fuse", "--save-path", str(tmp_path / "fused")]) == 0
    out = capsys.readouterr().out
    assert "Trainable parameters: 100.000%" in out and "Resumed from" in out and "Iter 4: train loss" in out
    assert "Iter 2: train loss" not in out.split("Resumed from")[1]
    saved = mx.load(str(tmp_path / "weights" / "adapters.safetensors"))
    assert "vision_tower.vision_model.post_layernorm.weight" in saved
    fused, processor = mp.load(str(tmp_path / "fused"), dtype=mx.float32)
    reloaded, _ = mp.load(str(FIXTURES / "paligemma2-tiny"), dtype=mx.float32, adapter_path=str(tmp_path / "weights"))
    batch = trainer.make_batch(processor, read_training_sets(str(data))["valid"])
    np.testing.assert_allclose(np.array(logits_of(fused, batch)), np.array(logits_of(reloaded, batch)), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["--num-layers", "0"], "--num-layers must be at least 1, or -1 for all, got 0"),
    (["--train-vision"], "--train-vision trains weights, not adapters"),
    (["--keep-best"], "--keep-best needs --eval-task"),
    (["--resume"], "nothing to resume in"),
])
def test_bad_options_end_with_one_line(tmp_path, capsys, argv, message):
    data = write_data(tmp_path / "data")
    rc = lora.main(["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--batch-size", "2",
                    "--adapter-path", str(tmp_path / "adapters")] + argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


@pytest.mark.parametrize("options", [dict(quantize_bits=4, group_size=32, quant_predicate="mixed_4_6"),
                                     dict(quantize_bits=4, group_size=32, q_mode="mxfp4")])
def test_fuse_requantizes_each_layer_as_the_base_stores_it(tmp_path, options):
    """A mixed-recipe or mxfp4 base, loaded dequantized on the CPU, is fused back to its own per-layer settings."""
    base = tmp_path / "base"
    convert(str(FIXTURES / "paligemma2-tiny"), str(base), "float32", **options)
    model, _ = mp.load(str(base))
    lora.save_fused(model, str(base), tmp_path / "fused")
    stored = json.loads((base / "config.json").read_text())["quantization"]
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["quantization"] == stored
    fused, _ = mp.load(str(tmp_path / "fused"), dtype=mx.float32)
    reference, _ = mp.load(str(base), dtype=mx.float32)

    def settings(m):
        return {name: (q.bits, q.group_size, q.mode) for name, q in m.named_modules() if hasattr(q, "bits")}

    assert settings(fused) == settings(reference)
    assert len({bits for bits, _, _ in settings(reference).values()}) == (2 if "quant_predicate" in options else 1)
