"""LoRA and QLoRA fine-tuning with PaliGemma's prefix/suffix loss; loading and fusing the adapters.

    python -m mlx_paligemma.lora --model paligemma2-3b-pt-224-4bit --data my_data --iters 200
    python -m mlx_paligemma.lora --model paligemma2-3b-pt-224-4bit --adapter-path adapters --fuse --save-path fused
    model, processor = mlx_paligemma.load("paligemma2-3b-pt-224-4bit", adapter_path="adapters")

`--data` holds train.jsonl, valid.jsonl and optionally test.jsonl, one example a line:
    {"image": "images/cat.jpg", "prefix": "caption en", "suffix": "a cat on a sofa"}
with `image` a path relative to the file, or an http(s) URL. Only the decoder's linears get adapters
(mlx-lm's LoRALinear, which wraps quantized layers too); the vision tower and the projector stay frozen.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .formats.adapters import save_adapters
from .formats.mlx import get_model_path, load_weights, quantize, write_model_folder
from .model import PaliGemma, suffix_loss
from .processor import InputError, PaliGemmaProcessor, load_image

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LAYER_GROUPS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


@dataclass
class Example:
    image: object  # a file path, or a PIL image downloaded from a URL
    prefix: str
    suffix: str


def read_jsonl(file: Path) -> List[Example]:
    """Every line parsed and its image opened now, so a bad line stops the run before training, naming the line."""
    examples = []
    for n, line in enumerate(Path(file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with image, prefix and suffix")
        for key in ("image", "prefix", "suffix"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: {key!r} is missing or not a string")
        if not row["suffix"]:
            raise InputError(f"{where}: empty suffix, nothing to learn")
        image = row["image"]
        if not image.startswith(("http://", "https://")):
            image = str((Path(file).parent / image).resolve())
        try:
            loaded = load_image(image)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        examples.append(Example(loaded if image.startswith("http") else image, row["prefix"], row["suffix"]))
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


def iterate_batches(data: List[Example], processor, batch_size: int, rng: Optional[np.random.Generator] = None,
                    loop: bool = False) -> Iterator[Dict[str, mx.array]]:
    """Batches in a fresh random order every epoch when `rng` is given (whole batches only), else in order."""
    if rng is not None and len(data) < batch_size:
        raise InputError(f"{len(data)} training examples, fewer than the batch size {batch_size}")
    while True:
        order = rng.permutation(len(data)) if rng is not None else np.arange(len(data))
        stop = len(data) - len(data) % batch_size if rng is not None else len(data)
        for start in range(0, stop, batch_size):
            yield make_batch(processor, [data[i] for i in order[start : start + batch_size]])
        if not loop:
            return


def loss_fn(model: PaliGemma, batch: Dict[str, mx.array]):
    """(mean cross-entropy over the batch's suffix tokens, number of those tokens): transformers' loss."""
    logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"])
    return suffix_loss(logits, batch["labels"]), (batch["labels"][:, 1:] != -100).sum()


def evaluate(model, data: List[Example], processor, batch_size: int, num_batches: int = -1) -> float:
    """Loss averaged over all suffix tokens of the first `num_batches` batches (-1: all of them)."""
    total, count = mx.array(0.0), mx.array(0)
    for i, batch in enumerate(iterate_batches(data, processor, batch_size)):
        if i == num_batches:
            break
        loss, n = loss_fn(model, batch)
        total, count = total + loss * n, count + n
        mx.eval(total, count)
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

    params = {"rank": rank, "scale": scale, "dropout": dropout, "keys": lora_keys(layers)}
    model.freeze()
    linear_to_lora_layers(model, num_layers, params)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def fuse(model: PaliGemma, dequantize: bool = False) -> PaliGemma:
    """Merge every LoRA layer into its base linear. A quantized base is re-quantized with its own settings,
    or, with `dequantize`, the whole model (the embedding too) is turned back to floats."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    return model


def stored_dtype(folder: Path) -> mx.Dtype:
    return next((w.dtype for w in load_weights(folder).values() if mx.issubdtype(w.dtype, mx.floating)), mx.float32)


def save_fused(model: PaliGemma, base_model: str, out, dequantize: bool = False) -> Path:
    """Fuse (in place) and write an MLX model folder (weights, config.json, tokenizer files) that load, generate
    and convert accept: quantized as the base model was, or all floats with `dequantize` (or a float base), in
    the base's stored float dtype. Written to a temporary folder and renamed at the end."""
    out, base = Path(out), get_model_path(base_model)
    if out.exists():
        raise InputError(f"output folder {out} already exists")
    config = json.loads((base / "config.json").read_text())
    quantization = None if dequantize else config.get("quantization")
    fuse(model, dequantize=quantization is None)
    if quantization is None:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        quantize(model, quantization["group_size"], quantization["bits"])  # the base was loaded dequantized (CPU)
    dtype = stored_dtype(base)  # the CPU backend computes in float32; write what the base stores
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    write_model_folder(out, weights, config, base)
    return out


@dataclass
class TrainingArgs:
    iters: int = 200
    batch_size: int = 4
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


def make_schedule(lr: float, iters: int, warmup: int) -> Callable:
    import mlx.optimizers as optim

    decay = optim.cosine_decay(lr, max(iters - warmup, 1))
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup), decay], [warmup])


def train(model: PaliGemma, processor: PaliGemmaProcessor, train_set: List[Example],
          valid_set: Optional[List[Example]] = None, args: TrainingArgs = TrainingArgs(),
          adapter_config: Optional[dict] = None, report: Callable[[str], None] = print) -> List[dict]:
    """Train the model's unfrozen parameters (the LoRA weights after `add_lora`). Returns the reports,
    dicts with "iteration" and "train_loss" or "val_loss"; saves adapters when `adapter_config` is given."""
    import mlx.optimizers as optim

    if args.grad_checkpoint and type(model.layers[0]).__call__.__name__ != "checkpointed_fn":
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])  # recompute each decoder block in the backward pass (patches the class)
    warmup = args.iters // 10 if args.warmup is None else args.warmup
    schedule = make_schedule(args.learning_rate, args.iters, warmup)
    optimizer = (optim.AdamW(schedule, weight_decay=args.weight_decay) if args.weight_decay
                 else optim.Adam(schedule))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    batches = iterate_batches(train_set, processor, args.batch_size, np.random.default_rng(args.seed), loop=True)

    def validate(it):
        tic = time.perf_counter()
        model.eval()  # no LoRA dropout
        loss = evaluate(model, valid_set, processor, args.batch_size, args.val_batches)
        model.train()
        report(f"Iter {it}: val loss {loss:.3f}, val took {time.perf_counter() - tic:.1f}s")
        history.append({"iteration": it, "val_loss": loss})

    history, losses, tokens, elapsed, steps = [], [], 0, 0.0, 0
    model.train()
    mx.reset_peak_memory()
    for it in range(1, args.iters + 1):
        if valid_set and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            validate(it)
        tic = time.perf_counter()
        batch = next(batches)
        (loss, _), grads = loss_and_grad(model, batch)
        if args.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        elapsed += time.perf_counter() - tic
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum().item())
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
        if adapter_config is not None and it % args.save_every == 0 and it < args.iters:
            save_adapters(model, args.adapter_path, adapter_config)
            report(f"Iter {it}: saved adapters to {args.adapter_path}")
    if adapter_config is not None:
        save_adapters(model, args.adapter_path, adapter_config)
        report(f"Saved adapters to {args.adapter_path}")
    model.eval()
    return history


def build_parser() -> argparse.ArgumentParser:
    d = TrainingArgs()
    p = argparse.ArgumentParser(description="LoRA / QLoRA fine-tuning of PaliGemma on image, prefix, suffix data.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id (quantized: QLoRA)")
    p.add_argument("--data", help="folder with train.jsonl, valid.jsonl and optional test.jsonl")
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --iters)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="> 0 uses AdamW")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0: off")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-layers", nargs="+", default=["all"],
                   help="decoder linears to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, "
                        "or attention, mlp, all (default)")
    p.add_argument("--num-layers", type=int, default=-1, help="adapt the last N decoder blocks (default: all)")
    p.add_argument("--adapter-path", default=d.adapter_path, help="where adapters are saved (or read, for --fuse)")
    p.add_argument("--val-batches", type=int, default=d.val_batches, help="batches per validation, -1: all")
    p.add_argument("--steps-per-eval", type=int, default=d.steps_per_eval)
    p.add_argument("--steps-per-report", type=int, default=d.steps_per_report)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--grad-checkpoint", action="store_true", help="trade compute for memory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fuse", action="store_true", help="write the model with the adapters merged to --save-path")
    p.add_argument("--save-path", default="fused_model")
    p.add_argument("--dequantize", action="store_true", help="with --fuse on a quantized model: write floats")
    return p


def run(args) -> None:
    from .loading import load

    if not args.data and not args.fuse:
        raise InputError("nothing to do: give --data to train, or --fuse to merge saved adapters")
    if args.fuse and Path(args.save_path).exists():
        raise InputError(f"output folder {args.save_path} already exists")
    if not args.data:  # fuse saved adapters
        model, _ = load(args.model, stored_dtype(get_model_path(args.model)), adapter_path=args.adapter_path)
        print(f"Wrote {save_fused(model, args.model, args.save_path, args.dequantize)}")
        return
    data = load_datasets(args.data)
    print(", ".join(f"{len(v)} {k}" for k, v in data.items()) + " examples, images checked")
    model, processor = load(args.model)
    mx.random.seed(args.seed)
    config = add_lora(model, args.lora_rank, args.lora_scale, args.lora_dropout, args.lora_layers, args.num_layers)
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = get_total_parameters(model)
    print(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.1f}M)")
    fields = {k: getattr(args, k) for k in asdict(TrainingArgs()) if hasattr(args, k)}
    targs = TrainingArgs(**fields)
    config.update(base_model=args.model, model_type="paligemma", training=asdict(targs))
    train(model, processor, data["train"], data.get("valid"), targs, adapter_config=config,
          report=lambda s: print(s, flush=True))
    if "test" in data:
        loss = evaluate(model, data["test"], processor, args.batch_size, args.val_batches)
        print(f"Test loss {loss:.3f}, test ppl {math.exp(min(loss, 50)):.3f}")
    if args.fuse:
        print(f"Wrote {save_fused(model, args.model, args.save_path, args.dequantize)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
