"""The one training loop: data, what trains (LoRA, attention-only, full), schedule, data-parallel gradient averaging,
checkpoints and resume, and the validation hooks (loss, and the task's own metric through mlx_paligemma.evaluate).

Data is JSONL, one example a line: {"image": "images/cat.jpg", "prefix": "caption en", "suffix": "a cat"}, with
`image` a path relative to the file or an http(s) URL; `suffix` may be a list of answers (one example each).
Under `mlx.launch` every process takes its share of each batch (--batch-size is per process) and the gradients are
averaged weighted by suffix tokens, so N processes train exactly as one with N times the batch; only rank 0 writes.
"""

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .formats.adapters import ADAPTER_FILE, save_adapters
from .formats.mlx import atomic_file
from .model import PaliGemma, suffix_loss
from .processor import InputError, PaliGemmaProcessor, check_text, load_image

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LAYER_GROUPS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
FINE_TUNE_TYPES = ("lora", "attention", "full")
# Written beside the adapters at every save, to resume from: optimizer state, and the step in trainer_state.json
# (the data order and each step's random draws follow from the seed and the step).
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"


@dataclass
class Example:
    image: object  # a file path, or a PIL image downloaded from a URL
    prefix: str
    suffix: str
    source: str = ""  # the line's `image` as written


def read_jsonl(file) -> List[Example]:
    """Every line parsed and its image opened now, so a bad line stops the run before training, naming the line.
    A URL is downloaded once however many lines name it."""
    examples, downloaded = [], {}
    try:
        text = Path(file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = Path(file).read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{file}, line {line}: not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from None
        except RecursionError:
            raise InputError(f"{where}: not valid JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with image, prefix and suffix")
        for key in ("image", "prefix"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: {key!r} is missing or not a string")
        suffixes = row.get("suffix")
        suffixes = [suffixes] if isinstance(suffixes, str) else suffixes
        if not isinstance(suffixes, list) or not suffixes or not all(isinstance(s, str) for s in suffixes):
            raise InputError(f"{where}: 'suffix' is missing or not a string (or a list of strings)")
        if not all(suffixes):
            raise InputError(f"{where}: empty suffix, nothing to learn")
        try:
            for key, value in [("prefix", row["prefix"])] + [("suffix", s) for s in suffixes]:
                check_text(value, key)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        source = row["image"]
        url = source.startswith(("http://", "https://"))
        try:
            image = source if url else str((Path(file).parent / source).resolve())
        except (ValueError, OSError) as e:  # a NUL or a lone surrogate in the name, a symlink loop
            raise InputError(f"{where}: image {source!r} is not a usable path: {e}") from None
        try:
            loaded = downloaded[image] if image in downloaded else load_image(image)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if url:
            downloaded[image] = loaded
        examples += [Example(loaded if url else image, row["prefix"], s, source) for s in suffixes]
    if not examples:
        raise InputError(f"{file} holds no examples")
    return examples


def load_datasets(folder) -> Dict[str, List[Example]]:
    """{"train": [...], "valid": [...], "test": [...]} from the files present; train.jsonl is required."""
    folder = Path(folder)
    if not (folder / "train.jsonl").is_file():
        raise InputError(f"no train.jsonl in {folder}")
    return {name: read_jsonl(folder / f"{name}.jsonl") for name in ("train", "valid", "test")
            if (folder / f"{name}.jsonl").is_file()}


def make_batch(processor: PaliGemmaProcessor, examples: Sequence[Example]) -> Dict[str, mx.array]:
    """Processor output for examples: left padded, token_type_ids 1 on the suffix, labels -100 off it."""
    return processor(images=[[e.image] for e in examples], text=[e.prefix for e in examples],
                     suffix=[e.suffix for e in examples])


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of training step `step` (from 1): whole batches of a fresh random order every epoch, a function
    of the seed and the step alone, so a resumed run sees what an uninterrupted one would."""
    per_epoch = n_examples // batch_size
    epoch, k = divmod(step - 1, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[k * batch_size:(k + 1) * batch_size]


def loss_fn(model: PaliGemma, batch: Dict[str, mx.array]):
    """(mean cross-entropy over the batch's suffix tokens, number of those tokens): transformers' loss."""
    logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"])
    return suffix_loss(logits, batch["labels"]), (batch["labels"][:, 1:] != -100).sum()


def evaluate_loss(model, data: List[Example], processor, batch_size: int, num_batches: int = -1) -> float:
    """Loss averaged over all suffix tokens of the first `num_batches` batches (-1: all of them); under mlx.launch
    each process takes every N-th batch and the sums are added up."""
    world = mx.distributed.init()
    total, count = mx.array(0.0), mx.array(0)
    starts = range(0, len(data), batch_size)
    for i, start in enumerate(starts[:None if num_batches < 0 else num_batches]):
        if i % world.size() == world.rank():
            loss, n = loss_fn(model, make_batch(processor, data[start:start + batch_size]))
            total, count = total + loss * n, count + n
            mx.eval(total, count)
    if world.size() > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / count).item()


def lora_keys(names: Sequence[str]) -> List[str]:
    """Module names inside a decoder layer from short names: q_proj ... down_proj, attention, mlp, all."""
    keys = []
    for name in names:
        if name not in LAYER_GROUPS and name not in ATTENTION + MLP:
            raise InputError(f"unknown LoRA layer {name!r}: choose from {', '.join(ATTENTION + MLP)}, "
                             f"{', '.join(LAYER_GROUPS)}")
        for short in LAYER_GROUPS.get(name, [name]):
            key = ("self_attn." if short in ATTENTION else "mlp.") + short
            if key not in keys:
                keys.append(key)
    return keys


def add_lora(model: PaliGemma, rank: int = 8, scale: float = 20.0, dropout: float = 0.0,
             layers: Sequence[str] = ("all",), num_layers: int = -1) -> dict:
    """Freeze the model and wrap the chosen linears of the last `num_layers` decoder blocks (-1: all) in
    mlx-lm's LoRALinear. Returns the adapter config (mlx-lm's adapter_config.json layout)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if rank < 1:
        raise InputError(f"--lora-rank must be at least 1, got {rank}")
    params = {"rank": rank, "scale": scale, "dropout": dropout, "keys": lora_keys(layers)}
    model.freeze()
    linear_to_lora_layers(model, num_layers, params)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def set_trainable(model: PaliGemma, fine_tune_type: str = "full", num_layers: int = -1,
                  train_vision: bool = False) -> dict:
    """Unfreeze what attention-only or full fine-tuning trains: the attention projections of the last `num_layers`
    decoder blocks (-1: all), or the whole decoder (those blocks only, when num_layers is given; else the tied
    embedding and the final norm too); `train_vision` adds the vision tower and the projector. Returns the
    checkpoint config: fine_tune_type "full" in mlx-lm's sense (the saved weights replace the base's, which is
    how load(..., adapter_path=...) applies them), `trained` saying which were chosen."""
    if fine_tune_type not in ("attention", "full"):
        raise InputError(f"unknown fine-tune type {fine_tune_type!r}: choose from {', '.join(FINE_TUNE_TYPES)}")
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        raise InputError(f"{fine_tune_type} fine-tuning trains the weights themselves: give a float model, not a "
                         "quantized one (or train LoRA adapters on it: QLoRA)")
    model.freeze()
    blocks = model.layers if num_layers < 0 else model.layers[len(model.layers) - num_layers:]
    if fine_tune_type == "full" and num_layers < 0:
        model.language_model.unfreeze()
    else:
        for block in blocks:
            (block.self_attn if fine_tune_type == "attention" else block).unfreeze()
    if train_vision:
        model.vision_tower.unfreeze()
        model.multi_modal_projector.unfreeze()
    return {"fine_tune_type": "full", "trained": fine_tune_type, "num_layers": num_layers, "train_vision": train_vision}


@dataclass
class TrainingArgs:
    iters: int = 200
    batch_size: int = 4  # per process under mlx.launch
    learning_rate: float = 1e-5
    warmup: Optional[int] = None  # linear warm-up steps before the cosine decay; None: a tenth of iters
    weight_decay: float = 0.0  # > 0 uses AdamW
    grad_clip: float = 1.0  # global gradient norm; 0 turns clipping off
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    adapter_path: str = "adapters"
    grad_checkpoint: bool = False
    seed: int = 0
    resume: bool = False  # continue from the checkpoint in adapter_path
    eval_task: Optional[str] = None  # also score generated answers on the validation set: auto, caption, vqa, ...
    eval_max_tokens: int = 64
    keep_best: bool = False  # with eval_task: the best-scoring weights go to adapter_path/best


def check_args(args: TrainingArgs) -> None:
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "eval_max_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.val_batches == 0 or args.val_batches < -1:
        raise InputError(f"--val-batches must be at least 1, or -1 for all, got {args.val_batches}")
    if args.keep_best and not args.eval_task:
        raise InputError("--keep-best needs --eval-task: the best is by the task's metric")


def make_schedule(lr: float, iters: int, warmup: int) -> Callable:
    import mlx.optimizers as optim

    decay = optim.cosine_decay(lr, max(iters - warmup, 1))
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup), decay], [warmup])


def average_gradients(grads, n_tokens: mx.array, world):
    """The gradient of the loss over every process's suffix tokens: each process's mean-loss gradient weighted by
    its share of the tokens, summed by mlx's batched all-reduce (which divides by the number of processes)."""
    total = mx.distributed.all_sum(n_tokens.astype(mx.float32), stream=mx.cpu)
    weight = n_tokens.astype(mx.float32) * world.size() / total
    return nn.average_gradients(tree_map(lambda g: g * weight, grads))


def save_checkpoint(model, optimizer, folder: Path, config: dict, step: int, best: Optional[float]) -> None:
    """Trained weights, optimizer state, then the step: each file renamed into place whole, the step last, so a run
    killed mid-save resumes from the previous checkpoint's step at worst with this one's weights."""
    save_adapters(model, folder, config)
    with atomic_file(folder / OPTIMIZER_FILE) as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(optimizer.state)))
    with atomic_file(folder / STATE_FILE) as tmp:
        tmp.write_text(json.dumps({"step": step, "best_score": best}))


def load_checkpoint(model, optimizer, folder: Path) -> dict:
    """Trained weights and optimizer state back in place; returns the saved state (step, best score)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / OPTIMIZER_FILE).is_file():
        raise InputError(f"nothing to resume in {folder}: no {STATE_FILE} or {OPTIMIZER_FILE}")
    model.load_weights(str(folder / ADAPTER_FILE), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER_FILE)).items()))
    return json.loads((folder / STATE_FILE).read_text())


def train(model: PaliGemma, processor: PaliGemmaProcessor, train_set: List[Example],
          valid_set: Optional[List[Example]] = None, args: TrainingArgs = TrainingArgs(),
          adapter_config: Optional[dict] = None, report: Callable[[str], None] = print) -> List[dict]:
    """Train the model's unfrozen parameters (after add_lora or set_trainable). Returns the reports, dicts with
    "iteration" and "train_loss", "val_loss" or "val_metrics"; writes checkpoints when `adapter_config` is given."""
    import mlx.optimizers as optim

    check_args(args)
    if args.eval_task and not valid_set:
        raise InputError("--eval-task scores the validation set: give one (valid.jsonl)")
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if len(train_set) < args.batch_size * size:
        raise InputError(f"{len(train_set)} training examples, fewer than the batch size "
                         f"{args.batch_size}" + (f" x {size} processes" if size > 1 else ""))
    writes = adapter_config is not None and rank == 0
    report = report if rank == 0 else (lambda s: None)
    if args.grad_checkpoint and type(model.layers[0]).__call__.__name__ != "checkpointed_fn":
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # recompute each decoder block in the backward pass (patches the class)
    warmup = args.iters // 10 if args.warmup is None else args.warmup
    schedule = make_schedule(args.learning_rate, args.iters, warmup)
    optimizer = (optim.AdamW(schedule, weight_decay=args.weight_decay) if args.weight_decay
                 else optim.Adam(schedule))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    folder = Path(args.adapter_path)
    start, best = 0, None
    if args.resume:
        state = load_checkpoint(model, optimizer, folder)
        start, best = state["step"], state.get("best_score")
        report(f"Resumed from {folder} at step {start}")
    score_task = None
    if args.eval_task:
        from .evaluate import evaluate_examples

        score_task = partial(evaluate_examples, task=args.eval_task, batch_size=args.batch_size,
                             max_tokens=args.eval_max_tokens)

    def validate(it):
        nonlocal best
        tic = time.perf_counter()
        model.eval()  # no LoRA dropout
        loss = evaluate_loss(model, valid_set, processor, args.batch_size, args.val_batches)
        report(f"Iter {it}: val loss {loss:.3f}, val took {time.perf_counter() - tic:.1f}s")
        history.append({"iteration": it, "val_loss": loss})
        if score_task is not None and rank == 0:  # the others go on to the next step and wait for rank 0 there
            tic = time.perf_counter()
            results, _ = score_task(model, processor, valid_set)
            report(f"Iter {it}: val {results['metric']} {results['score']:.4f}, took {time.perf_counter() - tic:.1f}s")
            history.append({"iteration": it, "val_metrics": results})
            if args.keep_best and (best is None or results["score"] > best):
                best = results["score"]
                if writes:
                    save_adapters(model, folder / "best", {**adapter_config, "best": {"iteration": it, **results}})
                    report(f"Iter {it}: best so far, saved to {folder / 'best'}")
        model.train()

    history, losses, tokens, elapsed, steps = [], [], 0, 0.0, 0
    model.train()
    mx.reset_peak_memory()
    for it in range(start + 1, args.iters + 1):
        if valid_set and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            validate(it)
        tic = time.perf_counter()
        mx.random.seed(args.seed * 1_000_003 + it)  # this step's random draws (LoRA dropout), the same on resume
        share = batch_indices(len(train_set), args.batch_size * size, args.seed, it)
        batch = make_batch(processor, [train_set[i] for i in share[rank * args.batch_size:][:args.batch_size]])
        (loss, n), grads = loss_and_grad(model, batch)
        n_batch = batch["attention_mask"].sum()
        if size > 1:
            grads = average_gradients(grads, n, world)
            loss = mx.distributed.all_sum(loss * n, stream=mx.cpu) / mx.distributed.all_sum(n, stream=mx.cpu)
            n_batch = mx.distributed.all_sum(n_batch, stream=mx.cpu)
        if args.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss, n_batch)
        elapsed += time.perf_counter() - tic
        losses.append(loss.item())
        tokens += n_batch.item()
        steps += 1
        if it % args.steps_per_report == 0 or it == args.iters:
            peak = mx.get_peak_memory() / 1e9
            entry = {"iteration": it, "train_loss": float(np.mean(losses)), "learning_rate": schedule(it - 1).item(),
                     "steps_per_second": steps / elapsed, "tokens_per_second": tokens / elapsed, "peak_memory": peak}
            report(f"Iter {it}: train loss {entry['train_loss']:.3f}, lr {entry['learning_rate']:.3e}, "
                   f"it/s {entry['steps_per_second']:.3f}, tokens/s {entry['tokens_per_second']:.1f}, "
                   f"peak mem {peak:.3f} GB")
            history.append(entry)
            losses, tokens, elapsed, steps = [], 0, 0.0, 0
        if writes and (it % args.save_every == 0 or it == args.iters):
            save_checkpoint(model, optimizer, folder, adapter_config, it, best)
            report(f"Iter {it}: saved to {folder}" if it < args.iters else f"Saved adapters to {folder}")
    model.eval()
    return history
