"""The one training loop: data, what trains (LoRA, attention-only, full), schedule, data-parallel gradient averaging,
checkpoints and resume, and the validation hooks (loss, and the task's own metric through mlx_paligemma.evaluate).

Data is JSONL, one example a line, in the one item format of mlx_paligemma.data.items: {"image": "images/cat.jpg",
"prefix": "caption en", "suffix": "a cat"} (`prompt` for `prefix` works too), with `image` a path relative to the
file or an http(s) URL; `suffix` may be a list of answers (one example each).
Under `mlx.launch` every process takes its share of each batch (--batch-size is per process) and the gradients are
averaged weighted by suffix tokens, so N processes train exactly as one with N times the batch; only rank 0 writes.
Every report is also a line of ADAPTER_PATH/log.jsonl, and the curves a plot beside it (mlx_paligemma.training_log).
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..data.items import Example
from ..extras import require
from ..formats.adapters import ADAPTER_FILE, CONFIG_FILE, save_adapters
from ..formats.atomic import atomic_file
from ..formats.mlx import check_safetensors
from ..models.paligemma import PaliGemma, suffix_loss
from ..processing.images import load_image
from ..processing.processor import IMAGE_TOKEN, PaliGemmaProcessor
from ..errors import InputError, cause, read_json_object
from .log import TrainingLog, check_trackers
from .output import BEST_DIR, OPTIMIZER_FILE, STATE_FILE, check_output_folder, has_checkpoint

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LAYER_GROUPS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
FINE_TUNE_TYPES = ("lora", "attention", "full")


def make_batch(processor: PaliGemmaProcessor, examples: Sequence[Example]) -> Dict[str, mx.array]:
    """Processor output for examples: left padded, token_type_ids 1 on the suffix, labels -100 off it. An image
    damaged past its header (the data set's check reads headers) is named by its example's file and line."""
    images = []
    for e in examples:
        try:
            images.append([load_image(e.image)])
        except InputError as error:
            raise InputError(f"{e.where}: {error}") from None
    return processor(images=images, text=[e.prefix for e in examples], suffix=[e.suffix for e in examples])


def check_examples(processor: PaliGemmaProcessor, examples: Sequence[Example]) -> None:
    """What make_batch would refuse at some later step, for every example now, naming its file and line: the
    prefix's <image> markers against its one image, a suffix holding <image>, the length against the model's."""
    seq, limit = processor.image_seq_length, processor.max_length
    for e in examples:
        if e.prefix.count(IMAGE_TOKEN) > 1:
            raise InputError(f"{e.where}: the prefix has {e.prefix.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers for "
                             "one image")
        if IMAGE_TOKEN in e.suffix:
            raise InputError(f"{e.where}: the suffix holds {IMAGE_TOKEN}: images go in the prefix")
        if limit is not None:
            prefix = processor.build_prompt(e.prefix, 1).replace(IMAGE_TOKEN, "")
            n = seq + len(processor.tokenizer.encode(prefix)) + len(processor.tokenizer.encode(e.suffix + "<eos>"))
            if n > limit:
                raise InputError(f"{e.where}: {n} tokens with the image's {seq}, more than the model's {limit}")


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
    overwrite: bool = False  # replace the adapters already in adapter_path (without it, that is refused)
    report_to: Tuple[str, ...] = ()  # trackers fed the reports besides adapter_path/log.jsonl: tensorboard


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


def data_fingerprint(examples: Sequence[Example]) -> str:
    """What the checkpoint was trained on, to refuse resuming on other data: a hash of every example in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.source, e.prefix, e.suffix]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# What a checkpoint must share with the command that resumes it: (key in adapter_config.json, option to name).
RESUME_SETTINGS = [
    ("fine_tune_type", "--fine-tune-type"), ("trained", "--fine-tune-type"), ("num_layers", "--num-layers"),
    ("train_vision", "--train-vision"), ("lora_parameters.rank", "--lora-rank"),
    ("lora_parameters.keys", "--lora-layers"), ("lora_parameters.scale", "--lora-scale"),
    ("base_model", "--model"), ("data", "the training data"),
]


def _setting(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _same_model(a, b) -> bool:
    if a == b:
        return True
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except (TypeError, OSError, ValueError):
        return False


def check_resume(folder: Path, config: dict) -> None:
    """Refuse, in one line and before anything is written, a checkpoint trained with other settings than `config`:
    resuming it would overwrite a good checkpoint with one that cannot load or has lost tensors."""
    names = (CONFIG_FILE, ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise InputError(f"nothing to resume in {folder}: no {', '.join(missing)}")
    saved = read_json_object(folder / CONFIG_FILE)
    for key, option in RESUME_SETTINGS:
        old, new = _setting(saved, key), _setting(config, key)
        if key == "base_model" and _same_model(old, new) or old == new:
            continue
        if key == "data":
            raise InputError(f"cannot resume from {folder}: its checkpoint was trained on other data (the examples "
                             "or their order differ); give the same --data, or another --adapter-path")
        if key == "trained":
            old, new = old or _setting(saved, "fine_tune_type"), new or _setting(config, "fine_tune_type")
        raise InputError(f"cannot resume from {folder}: its checkpoint has {option} {json.dumps(old)}, this command "
                         f"{json.dumps(new)}; give the same, or another --adapter-path")


def _read_safetensors(file: Path) -> Dict[str, mx.array]:
    if not file.is_file():
        raise InputError(f"nothing to resume in {file.parent}: no {file.name}")
    check_safetensors(file)
    try:
        return mx.load(str(file))
    except Exception as e:
        raise InputError(f"{file} is damaged: {cause(e)}") from None


def load_checkpoint(model, optimizer, folder: Path) -> dict:
    """Trained weights and optimizer state back in place; returns the saved state (step, best score). Every file is
    checked against the model's trainable parameters first: a damaged or foreign one is one line naming it."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / OPTIMIZER_FILE).is_file():
        raise InputError(f"nothing to resume in {folder}: no {STATE_FILE} or {OPTIMIZER_FILE}")
    state = read_json_object(folder / STATE_FILE)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError(f"{folder / STATE_FILE}: 'step' must be a whole number >= 0, got {json.dumps(step)}")
    best = state.get("best_score")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool)):
        raise InputError(f"{folder / STATE_FILE}: 'best_score' must be a number, got {json.dumps(best)}")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    weights = _read_safetensors(folder / ADAPTER_FILE)
    for name, w in trainable.items():
        if name not in weights or weights[name].shape != w.shape:
            raise InputError(f"{folder / ADAPTER_FILE} does not fit this model's trainable parameters: "
                             f"{name} is {'missing' if name not in weights else tuple(weights[name].shape)}, "
                             f"expected {tuple(w.shape)}")
    saved = _read_safetensors(folder / OPTIMIZER_FILE)
    moments = {k.rsplit(".", 1)[0] for k in saved if k not in ("step", "learning_rate")}
    if moments != set(trainable):
        odd = sorted(moments ^ set(trainable))[0]
        raise InputError(f"{folder / OPTIMIZER_FILE} does not fit this model's trainable parameters ({odd})")
    model.load_weights([(k, weights[k]) for k in trainable], strict=False)
    optimizer.state = tree_unflatten(list(saved.items()))
    return {"step": step, "best_score": best}


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
    folder = Path(args.adapter_path)
    # Everything that could stop the run later is checked now, before the first step and before anything is written.
    check_trackers(args.report_to)
    # --resume where a run stopped before its first checkpoint (only its own log or curves there, as
    # check_output_folder makes sure) starts it again from step 0.
    resume = args.resume and (adapter_config is None or has_checkpoint(folder))
    if adapter_config is not None:
        check_output_folder(folder, args.resume, args.overwrite)
        adapter_config = {**adapter_config, "data": data_fingerprint(train_set)}
        if resume:
            check_resume(folder, adapter_config)
    check_examples(processor, train_set)
    check_examples(processor, valid_set or [])
    if args.eval_task:
        from ..tasks.evaluation import task_of

        tasks = {args.eval_task} if args.eval_task != "auto" else {task_of(e.prefix) for e in valid_set or []}
        if tasks & {"detect", "segment"}:
            require("eval", "--eval-task's detection metrics")  # the first validation needs it, after steps
    report = report if rank == 0 else (lambda s: None)
    if args.grad_checkpoint and type(model.layers[0]).__call__.__name__ != "checkpointed_fn":
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # recompute each decoder block in the backward pass (patches the class)
    warmup = args.iters // 10 if args.warmup is None else args.warmup
    schedule = make_schedule(args.learning_rate, args.iters, warmup)
    optimizer = (optim.AdamW(schedule, weight_decay=args.weight_decay) if args.weight_decay
                 else optim.Adam(schedule))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    start, best = 0, None
    if resume:
        state = load_checkpoint(model, optimizer, folder)
        start, best = state["step"], state["best_score"]
        if start >= args.iters:
            raise InputError(f"{folder} is at step {start} already: give --iters above it to train on")
        report(f"Resumed from {folder} at step {start}")
    elif args.resume:
        report(f"No checkpoint in {folder} yet: training from step 1")
    log = TrainingLog(folder, start, args.report_to) if writes else None
    score_task = None
    if args.eval_task:
        from ..tasks.evaluation import evaluate_examples

        score_task = partial(evaluate_examples, task=args.eval_task, batch_size=args.batch_size,
                             max_tokens=args.eval_max_tokens)

    def validate(it):
        nonlocal best
        tic = time.perf_counter()
        model.eval()  # no LoRA dropout
        loss = evaluate_loss(model, valid_set, processor, args.batch_size, args.val_batches)
        record({"iteration": it, "val_loss": loss})  # logged before it is said: a stopped run has what it printed
        report(f"Iter {it}: val loss {loss:.3f}, val took {time.perf_counter() - tic:.1f}s")
        if score_task is not None and rank == 0:  # the others go on to the next step and wait for rank 0 there
            tic = time.perf_counter()
            results, _ = score_task(model, processor, valid_set)
            record({"iteration": it, "val_metrics": results})
            report(f"Iter {it}: val {results['metric']} {results['score']:.4f}, took {time.perf_counter() - tic:.1f}s")
            if args.keep_best and (best is None or results["score"] > best):
                best = results["score"]
                if writes:
                    save_adapters(model, folder / BEST_DIR, {**adapter_config, "best": {"iteration": it, **results}})
                    report(f"Iter {it}: best so far, saved to {folder / BEST_DIR}")
        model.train()

    def record(entry):
        history.append(entry)
        if log is not None:
            log.write(entry)

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
            record(entry)
            report(f"Iter {it}: train loss {entry['train_loss']:.3f}, lr {entry['learning_rate']:.3e}, "
                   f"it/s {entry['steps_per_second']:.3f}, tokens/s {entry['tokens_per_second']:.1f}, "
                   f"peak mem {peak:.3f} GB")
            losses, tokens, elapsed, steps = [], 0, 0.0, 0
        if writes and (it % args.save_every == 0 or it == args.iters):
            save_checkpoint(model, optimizer, folder, adapter_config, it, best)
            report(f"Iter {it}: saved to {folder}" if it < args.iters else f"Saved adapters to {folder}")
    if log is not None:
        log.close(report)
    model.eval()
    return history
