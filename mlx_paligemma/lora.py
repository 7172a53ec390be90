"""Fine-tuning from the command line: LoRA / QLoRA (the default), attention-only and full fine-tuning, on one process
or several under mlx.launch, with the training loop of mlx_paligemma.training.trainer; fusing adapters into a model folder.

    python -m mlx_paligemma.lora --model paligemma2-3b-pt-224-4bit --data my_data --iters 200
    python -m mlx_paligemma.lora --model paligemma2-3b-pt-224 --data my_data --fine-tune-type full --train-vision
    python -m mlx_paligemma.lora --model M --data my_data --resume      # on from the last checkpoint in --adapter-path
    mlx.launch -n 2 --backend ring --python $(which python) -- -m mlx_paligemma.lora --model M --data D --batch-size 2
    python -m mlx_paligemma.lora --model paligemma2-3b-pt-224-4bit --adapter-path adapters --fuse --output fused
    model, processor = mlx_paligemma.load("paligemma2-3b-pt-224-4bit", adapter_path="adapters")

`--data` holds train.jsonl, valid.jsonl and optionally test.jsonl (see mlx_paligemma.training.trainer for the format), or is
any source of mlx_paligemma.data.sources (a Hugging Face dataset, parquet files, a COCO annotation file) with its splits.
LoRA adapts the decoder's linears (mlx-lm's LoRALinear, which wraps quantized layers too); attention-only and full
fine-tuning train the weights themselves, and `--train-vision` adds the vision tower and the projector.
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .cli import ArgumentParser, command, run_main
from .extras import require
from .formats.atomic import check_new_folder
from .generation.adapters import add_limit_arguments, set_limits
from .formats.mlx import get_model_path, load_weights, quantize_as_stored, write_model_folder
from .models.paligemma import PaliGemma
from .errors import InputError
from .tasks.evaluation import TASKS, task_of
from .data.sources import add_data_arguments, data_options, read_training_sets
from .training.trainer import (FINE_TUNE_TYPES, TrainingArgs, add_lora, check_output_folder, evaluate_loss,
    set_trainable, train)
from .training.log import TRACKERS, check_trackers, plot_run


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
    check_new_folder(out)
    config = json.loads((base / "config.json").read_text())
    quantization = None if dequantize else config.get("quantization")
    fuse(model, dequantize=quantization is None)
    if quantization is None:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        # The base was loaded dequantized (CPU): each layer goes back to its stored bits, group size and mode.
        quantize_as_stored(model, quantization, load_weights(base), base)
    dtype = stored_dtype(base)  # the CPU backend computes in float32; write what the base stores
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    write_model_folder(out, weights, config, base)
    return out


def millions(n: int) -> str:
    """A parameter count at the same precision for the trained part and the whole (0.214M of 0.252M)."""
    return f"{n / 1e6:.3f}M" if n < 1e9 else f"{n / 1e9:.3f}B"


def build_parser() -> ArgumentParser:
    d = TrainingArgs()
    p = ArgumentParser(description="Fine-tune PaliGemma on image, prefix, suffix data: LoRA / QLoRA, "
                                            "attention-only or full.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id (quantized: QLoRA)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--data", help="folder with train.jsonl, valid.jsonl and optional test.jsonl; or a Hugging Face "
                   "dataset (hub id, save_to_disk folder, parquet files) or a COCO annotation file")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, default="lora",
                   help="lora: adapters on the decoder's linears; attention: the decoder's attention weights; "
                        "full: the whole decoder")
    p.add_argument("--train-vision", action="store_true",
                   help="with attention or full: also train the vision tower and the projector")
    p.add_argument("--iters", type=int, default=d.iters, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples a step, per process under mlx.launch")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="peak rate, after warm-up, then a cosine decay")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --iters)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="> 0 uses AdamW")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0: off")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA matrices")
    p.add_argument("--lora-scale", type=float, default=20.0, help="multiplier of the LoRA update, as in mlx-lm")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-layers", nargs="+", default=["all"],
                   help="decoder linears to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, "
                        "or attention, mlp, all (default: all)")
    p.add_argument("--num-layers", type=int, default=-1, help="train the last N decoder blocks (default: all)")
    p.add_argument("--adapter-path", default=d.adapter_path,
                   help="where adapters (or fine-tuned weights) and checkpoints are saved, or read for --fuse")
    add_limit_arguments(p)  # what --fuse loads
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --adapter-path (its "
                   "settings and data must be this command's); a run stopped before its first one starts again")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint a run wrote in --adapter-path "
                   "(without it, or --resume, a folder holding one is refused)")
    p.add_argument("--val-batches", type=int, default=d.val_batches, help="batches per validation, -1: all")
    p.add_argument("--steps-per-eval", type=int, default=d.steps_per_eval, help="steps between validations")
    p.add_argument("--eval-task", choices=("auto",) + TASKS,
                   help="also generate for the validation set and report the task's metric (auto: from prefixes)")
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens, help="with --eval-task: most tokens "
                   "per generated answer")
    p.add_argument("--keep-best", action="store_true",
                   help="with --eval-task: write the best-scoring weights to ADAPTER_PATH/best")
    p.add_argument("--steps-per-report", type=int, default=d.steps_per_report, help="steps between loss reports")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument("--report-to", nargs="+", choices=TRACKERS, default=[], help="also send every report to these "
                   "trackers (default: none; ADAPTER_PATH/log.jsonl and curves.png are always written)")
    p.add_argument("--grad-checkpoint", action="store_true", help="trade compute for memory")
    p.add_argument("--seed", type=int, default=d.seed, help="LoRA initialisation, data order, dropout")
    p.add_argument("--fuse", action="store_true", help="write the model with the adapters merged to --output")
    p.add_argument("--output", "--save-path", dest="save_path", metavar="OUTPUT", default="fused_model",
                   help="with --fuse: the model folder to write, which must not exist")
    p.add_argument("--dequantize", action="store_true", help="with --fuse on a quantized model: write floats")
    add_data_arguments(p, training=True)
    return p


def run(args) -> None:
    from .formats.loading import load

    if not args.data and not args.fuse:
        raise InputError("nothing to do: give --data to train, or --fuse to merge saved adapters")
    if args.fuse:  # written at the end: checked now, so that a long run does not end in a refusal
        check_new_folder(Path(args.save_path), probe=True)
    if args.data:
        check_trackers(args.report_to)
        check_output_folder(Path(args.adapter_path), args.resume, args.overwrite)
    if not args.data:  # fuse saved adapters
        set_limits(args)
        base = str(get_model_path(args.model, args.revision))
        model, _ = load(base, stored_dtype(Path(base)), adapter_path=args.adapter_path)
        print(f"Wrote {save_fused(model, base, args.save_path, args.dequantize)}")
        return
    if args.train_vision and args.fine_tune_type == "lora":
        raise InputError("--train-vision trains weights, not adapters: use it with --fine-tune-type attention or full")
    if args.num_layers == 0 or args.num_layers < -1:
        raise InputError(f"--num-layers must be at least 1, or -1 for all, got {args.num_layers}")
    targs = TrainingArgs(**{k: getattr(args, k) for k in asdict(TrainingArgs()) if hasattr(args, k)})
    rank = mx.distributed.init().rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    data = read_training_sets(args.data, data_options(args), args.train_split, args.valid_split, args.test_split)
    say(", ".join(f"{len(v)} {k}" for k, v in data.items()) + " examples, images checked")
    tasks = {args.eval_task if args.eval_task != "auto" else task_of(e.prefix) for e in data.get("valid", [])}
    if args.eval_task and tasks & {"detect", "segment"}:
        require("eval", "--eval-task's detection metrics")  # before the first step, not at the first evaluation
    model, processor = load(args.model, revision=args.revision)
    mx.random.seed(args.seed)  # the LoRA initialisation, the same in every process
    if args.fine_tune_type == "lora":
        config = add_lora(model, args.lora_rank, args.lora_scale, args.lora_dropout, args.lora_layers,
                          args.num_layers)
    else:
        config = set_trainable(model, args.fine_tune_type, args.num_layers, args.train_vision)
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = get_total_parameters(model)  # LoRA's matrices included; quantized weights counted unpacked
    say(f"Trainable parameters: {100 * trainable / total:.3f}% ({millions(trainable)} of {millions(total)})")
    config.update(base_model=args.model, model_type="paligemma", training=asdict(targs))
    try:
        train(model, processor, data["train"], data.get("valid"), targs, adapter_config=config,
              report=lambda s: print(s, flush=True))
    except KeyboardInterrupt:  # stopped by hand: the curves so far, from the log
        if rank == 0:
            plot_run(args.adapter_path, say)
        raise
    if "test" in data:
        loss = evaluate_loss(model, data["test"], processor, args.batch_size, args.val_batches)
        say(f"Test loss {loss:.3f}, test ppl {math.exp(min(loss, 50)):.3f}")
    if args.fuse and rank == 0:
        base = str(get_model_path(args.model, args.revision))
        print(f"Wrote {save_fused(model, base, args.save_path, args.dequantize)}")


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
