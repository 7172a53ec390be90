"""The trainer: full and attention-only fine-tuning (gradients, loss), resume, data-parallel runs, the metric hook."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.training import trainer
from mlx_paligemma.convert import quantize
from mlx_paligemma.formats.adapters import ADAPTER_FILE, CONFIG_FILE
from mlx_paligemma.errors import InputError

IMAGES = FIXTURES / "images"
TEACH = [("chelsea.jpg", "caption en", "a cat"), ("coffee.jpg", "caption en", "a cup of coffee"),
         ("odd.png", "answer en what is it?", "an odd picture"), ("gray.png", "caption en", "grey")]


def fresh(name="paligemma2-tiny"):
    return mp.load(str(FIXTURES / name), dtype=mx.float32)


def examples(rows=TEACH):
    return [trainer.Example(str(IMAGES / i), p, s) for i, p, s in rows]


def test_full_fine_tuning_loss_matches_transformers(model_name, reference, cases):
    model, processor = fresh(model_name)
    trainer.set_trainable(model, "full", train_vision=True)
    case = cases["suffix"]
    texts = case["text"] * len(case["images"]) if len(case["text"]) == 1 else case["text"]
    batch = trainer.make_batch(processor, [trainer.Example(row[0], t, s) for row, t, s in
                                           zip(images_of(case), texts, case["suffix"])])
    loss, _ = trainer.loss_fn(model, batch)
    assert abs(loss.item() - float(reference["suffix/loss"])) < 1e-4


def test_what_each_fine_tune_type_trains():
    model, _ = fresh()
    trainer.set_trainable(model, "attention", num_layers=1)
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == sorted(
        f"language_model.model.layers.2.self_attn.{p}_proj.weight" for p in "qkvo")
    trainer.set_trainable(model, "full")
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert all(k.startswith("language_model.") for k in names) and "language_model.model.embed_tokens.weight" in names
    assert len(names) == len([k for k, _ in tree_flatten(model.language_model.parameters())])
    trainer.set_trainable(model, "full", train_vision=True)
    assert len(tree_flatten(model.trainable_parameters())) == len(tree_flatten(model.parameters()))
    with pytest.raises(InputError, match="unknown fine-tune type 'dora'"):
        trainer.set_trainable(model, "dora")
    quantize(model, group_size=32, bits=8)
    with pytest.raises(InputError, match="give a float model"):
        trainer.set_trainable(model, "full")


@pytest.mark.parametrize("name", [
    "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.2.self_attn.k_proj.weight",
    "language_model.model.embed_tokens.weight",  # tied: the input embedding and the output head
    "language_model.model.norm.weight",
    "multi_modal_projector.linear.weight",
    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.post_layernorm.bias",
])
def test_full_and_vision_gradients_match_finite_differences(name):
    model, processor = fresh()
    trainer.set_trainable(model, "full", train_vision=True)
    batch = trainer.make_batch(processor, examples()[:2])
    (_, _), grads = nn.value_and_grad(model, trainer.loss_fn)(model, batch)
    p0 = dict(tree_flatten(model.parameters()))[name]
    mx.random.seed(3)
    direction = mx.random.normal(p0.shape)
    direction = direction / mx.linalg.norm(direction)

    def loss_at(t):
        model.update(tree_unflatten([(name, p0 + t * direction)]))
        return trainer.loss_fn(model, batch)[0].item()

    eps = 1e-2
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = (dict(tree_flatten(grads))[name] * direction).sum().item()
    assert abs(numeric - analytic) <= 5e-3 * abs(analytic) + 2e-4, (numeric, analytic)


def test_the_data_order_is_a_function_of_seed_and_step():
    steps = [trainer.batch_indices(10, 4, seed=0, step=s) for s in range(1, 5)]
    assert len(set(np.concatenate(steps[:2]))) == 8  # epoch 1: two batches of 4, no repeats
    assert not np.array_equal(steps[0], steps[2])  # epoch 2: a new order
    np.testing.assert_array_equal(trainer.batch_indices(10, 4, 0, 3), steps[2])


def run_training(folder, iters, resume=False, stop_after=None, kind="full"):
    model, processor = fresh()
    mx.random.seed(0)
    config = trainer.add_lora(model, rank=4, dropout=0.1) if kind == "lora" else trainer.set_trainable(model, kind)
    args = trainer.TrainingArgs(iters=iters, batch_size=2, learning_rate=1e-3, steps_per_report=2, save_every=3,
                                adapter_path=str(folder), resume=resume)

    def report(line):
        if stop_after is not None and line.startswith(f"Iter {stop_after}: saved"):
            raise KeyboardInterrupt  # the run is cut short right after a checkpoint

    try:
        trainer.train(model, processor, examples(), args=args, adapter_config=config, report=report)
    except KeyboardInterrupt:
        pass
    return dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, kind):
    whole = run_training(tmp_path / "whole", 7, kind=kind)
    run_training(tmp_path / "cut", 7, stop_after=3, kind=kind)
    assert json.loads((tmp_path / "cut" / trainer.STATE_FILE).read_text())["step"] == 3
    resumed = run_training(tmp_path / "cut", 7, resume=True, kind=kind)
    assert resumed.keys() == whole.keys()
    for k in whole:
        np.testing.assert_allclose(np.array(resumed[k]), np.array(whole[k]), atol=1e-6, err_msg=k)
    saved = mx.load(str(tmp_path / "cut" / ADAPTER_FILE))
    for k in whole:
        np.testing.assert_array_equal(np.array(saved[k]), np.array(resumed[k]), err_msg=k)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(InputError, match="nothing to resume in"):
        run_training(tmp_path, 4, resume=True)


def test_fine_tuned_weights_reload(tmp_path):
    model, processor = fresh()
    config = trainer.set_trainable(model, "attention")
    trainer.train(model, processor, examples(), args=trainer.TrainingArgs(
        iters=3, batch_size=2, learning_rate=1e-3, adapter_path=str(tmp_path)), adapter_config=config,
        report=lambda s: None)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["fine_tune_type"] == "full" and config["trained"] == "attention"  # mlx-lm: weights, not LoRA
    reloaded, _ = mp.load(str(FIXTURES / "paligemma2-tiny"), dtype=mx.float32, adapter_path=str(tmp_path))
    batch = trainer.make_batch(processor, examples())
    np.testing.assert_array_equal(np.array(trainer.loss_fn(reloaded, batch)[0]),
                                  np.array(trainer.loss_fn(model, batch)[0]))


def test_the_metric_hook_keeps_the_best(tmp_path):
    model, processor = fresh()
    config = trainer.set_trainable(model, "full")
    data = examples([("chelsea.jpg", "detect cat", "<loc0064><loc0400><loc0860><loc0900> cat"),
                     ("coffee.jpg", "caption en", "a cup of coffee")])
    args = trainer.TrainingArgs(iters=30, batch_size=2, learning_rate=3e-3, steps_per_eval=10, steps_per_report=10,
                                adapter_path=str(tmp_path), eval_task="auto", eval_max_tokens=12, keep_best=True)
    lines = []
    history = trainer.train(model, processor, data, data, args, adapter_config=config, report=lines.append)
    scores = [h["val_metrics"] for h in history if "val_metrics" in h]
    assert [h["iteration"] for h in history if "val_metrics" in h] == [1, 10, 20, 30]
    assert scores[0]["metric"] == "mean of caption cider, detect map"
    assert scores[-1]["tasks"]["detect"]["map"] == pytest.approx(1.0)
    best = json.loads((tmp_path / "best" / CONFIG_FILE).read_text())["best"]
    assert best["score"] == max(s["score"] for s in scores)
    assert any(line.startswith("Iter 1: val mean of caption cider, detect map") for line in lines)


@pytest.mark.parametrize("change, message", [
    (dict(iters=0), "--iters must be at least 1, got 0"),
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(learning_rate=0.0), "--learning-rate must be positive"),
    (dict(val_batches=0), "--val-batches must be at least 1, or -1"),
    (dict(keep_best=True), "--keep-best needs --eval-task"),
    (dict(batch_size=5), "4 training examples, fewer than the batch size 5"),
    (dict(eval_task="auto"), "--eval-task scores the validation set"),
])
def test_bad_training_arguments(change, message):
    model, processor = fresh()
    trainer.set_trainable(model, "attention")
    with pytest.raises(InputError, match=message):
        trainer.train(model, processor, examples(), args=trainer.TrainingArgs(**change), report=lambda s: None)


def test_two_processes_train_as_one_with_twice_the_batch(tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.is_file():
        pytest.skip("mlx.launch is not installed beside this Python")
    data = tmp_path / "data"
    data.mkdir()
    # Four examples of different lengths: the token-weighted average is what makes the two runs agree.
    (data / "train.jsonl").write_text("".join(json.dumps({"image": str(IMAGES / i), "prefix": p, "suffix": s}) + "\n"
                                              for i, p, s in TEACH))
    common = ["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--iters", "4",
              "--learning-rate", "3e-4", "--lora-rank", "4", "--steps-per-report", "2"]
    one = subprocess.run([sys.executable, "-m", "mlx_paligemma.lora", *common, "--batch-size", "4",
                          "--adapter-path", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, str(launcher), "-n", "2", "--backend", "ring", "--python", sys.executable,
                          "--", "-m", "mlx_paligemma.lora", *common, "--batch-size", "2",
                          "--adapter-path", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("Iter 4: train loss") == 1  # only rank 0 reports
    a, b = mx.load(str(tmp_path / "one" / ADAPTER_FILE)), mx.load(str(tmp_path / "two" / ADAPTER_FILE))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-5, err_msg=k)
    loss = [line.split("train loss ")[1].split(",")[0] for line in one.stdout.splitlines() if "train loss" in line]
    assert loss == [line.split("train loss ")[1].split(",")[0] for line in two.stdout.splitlines()
                    if "train loss" in line]
    # Only rank 0 writes the log: each report once, as the one-process run's.
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [e["iteration"] for e in logs[1]] == [e["iteration"] for e in logs[0]] == [2, 4]
    assert [e["train_loss"] for e in logs[1]] == pytest.approx([e["train_loss"] for e in logs[0]], abs=1e-5)
