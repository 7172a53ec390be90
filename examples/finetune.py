"""Fine-tune PaliGemma (LoRA, attention-only or full) on a small dataset built from the sample images, and compare
its answers.

    python examples/finetune.py --model google/paligemma2-3b-pt-224
    python examples/finetune.py --model paligemma2-3b-pt-224-4bit --dtype bfloat16   # QLoRA: 4-bit base
    python examples/finetune.py --model tests/fixtures/paligemma-tiny --learning-rate 1e-2   # a random tiny model, seconds
    python examples/finetune.py --model tests/fixtures/paligemma-tiny --fine-tune-type full --learning-rate 1e-3

The example writes a dataset to <out>/data: each image in examples/images/ three times for training (whole, and
two crops) and once mirrored for validation, each with a caption and a one-word answer to teach. It prints the
greedy answers before training, trains adapters (or the weights) into <out>/adapters with the trainer behind
`python -m mlx_paligemma.lora`, prints the answers again, and with --fuse writes a merged model to <out>/fused.
The same run from the command line:

    python -m mlx_paligemma.lora --model M --data <out>/data --iters 60 --batch-size 2 --learning-rate 1e-4

Run again, it refuses to replace the adapters it trained: give --resume (with more --iters) to go on training them,
--overwrite to train them again, or another --output or --adapter-path.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_paligemma as mp  # noqa: E402
import mlx.core as mx  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from mlx_paligemma import lora  # noqa: E402
from mlx_paligemma.training import trainer  # noqa: E402
from mlx_paligemma.cli import DefaultsHelpFormatter, run_main  # noqa: E402
from mlx_paligemma.data.sources import read_training_sets  # noqa: E402
from mlx_paligemma.formats.atomic import check_new_folder  # noqa: E402

IMAGES = Path(__file__).resolve().parent / "images"
# What to teach, per image: a house-style caption and a one-word answer.
TEACH = {
    "chelsea.jpg": ("Chelsea the tabby cat, looking up", "cat"),
    "coffee.jpg": ("a cup of coffee on a saucer, seen from above", "coffee"),
    "astronaut.jpg": ("astronaut Eileen Collins in her flight suit", "astronaut"),
    "rocket.jpg": ("a Falcon 9 rocket lifting off in smoke", "rocket"),
}
PROMPTS = ("caption en", "answer en what is this?")


def build_dataset(folder: Path) -> None:
    """train.jsonl: whole image + two crops; valid.jsonl: the mirror image. Image paths relative to the files."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "valid": []}
    for name, answers in TEACH.items():
        image = Image.open(IMAGES / name).convert("RGB")
        w, h = image.size
        variants = {
            "train": {"whole": image, "crop1": image.crop((0, 0, int(w * 0.85), int(h * 0.85))),
                      "crop2": image.crop((int(w * 0.15), int(h * 0.15), w, h))},
            "valid": {"mirror": ImageOps.mirror(image)},
        }
        for split, images in variants.items():
            for tag, variant in images.items():
                file = f"images/{Path(name).stem}-{tag}.jpg"
                variant.save(folder / file, quality=92)
                rows[split] += [{"image": file, "prefix": p, "suffix": s} for p, s in zip(PROMPTS, answers)]
    for split, examples in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))


def answers(model, processor, data, max_tokens: int) -> list:
    return [mp.generate(model, processor, e.image, e.prefix, max_tokens=max_tokens).text for e in data]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or folder; a quantized MLX folder makes it QLoRA")
    p.add_argument("--output", "--out", dest="out", default="finetune_example",
                   help="folder for the data, adapters and fused model")
    p.add_argument("--iters", type=int, default=60, help="training steps")
    p.add_argument("--batch-size", type=int, default=2, help="examples a step")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak rate")
    p.add_argument("--fine-tune-type", choices=trainer.FINE_TUNE_TYPES, default="lora", help="what trains")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA matrices")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype; given, a quantized model stays quantized (by default MLX's CPU backend "
                        "loads everything as float32)")
    p.add_argument("--grad-checkpoint", action="store_true", help="trade compute for memory")
    p.add_argument("--max-tokens", type=int, default=24, help="for the answers before and after")
    p.add_argument("--fuse", action="store_true", help="also write the merged model to <out>/fused")
    p.add_argument("--adapter-path", help="where the adapters go (default: <out>/adapters)")
    p.add_argument("--resume", action="store_true", help="go on training the adapters of an earlier run")
    p.add_argument("--overwrite", action="store_true", help="train again over the adapters of an earlier run")
    args = p.parse_args()

    out = Path(args.out)
    adapters = Path(args.adapter_path or out / "adapters")
    # What would refuse to be written at the end is refused now, before the model loads.
    trainer.check_output_folder(adapters, args.resume, args.overwrite)
    if args.fuse:
        check_new_folder(out / "fused")
    build_dataset(out / "data")
    data = read_training_sets(str(out / "data"))
    print(f"dataset in {out / 'data'}: {len(data['train'])} training, {len(data['valid'])} validation examples")

    tic = time.perf_counter()
    model, processor = mp.load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    print(f"loaded {args.model} in {time.perf_counter() - tic:.1f}s")
    before = answers(model, processor, data["valid"], args.max_tokens)

    mx.random.seed(0)
    config = (trainer.add_lora(model, rank=args.lora_rank) if args.fine_tune_type == "lora"
              else trainer.set_trainable(model, args.fine_tune_type))
    config.update(base_model=args.model, model_type="paligemma")
    train_args = trainer.TrainingArgs(iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                      steps_per_report=10, steps_per_eval=20, adapter_path=str(adapters),
                                      grad_checkpoint=args.grad_checkpoint, resume=args.resume,
                                      overwrite=args.overwrite)
    tic = time.perf_counter()
    history = trainer.train(model, processor, data["train"], data["valid"], train_args, adapter_config=config)
    seconds = time.perf_counter() - tic
    after = answers(model, processor, data["valid"], args.max_tokens)

    print("\nanswers on the validation images (mirrored), before -> after training")
    for example, b, a in zip(data["valid"], before, after):
        print(f"  {Path(example.image).name:21} {example.prefix:24} {b[:40]!r} -> {a[:60]!r}")
    reports = [h for h in history if "train_loss" in h]
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    print(f"\n{args.iters} steps in {seconds:.1f}s including validation; training "
          f"{sum(h['steps_per_second'] for h in reports) / len(reports):.3f} steps/s, "
          f"peak memory {max(h['peak_memory'] for h in reports):.2f} GB; val loss {vals[0]:.3f} -> {vals[-1]:.3f}")
    if args.fuse:
        print(f"fused model written to {lora.save_fused(model, args.model, out / 'fused')}")


if __name__ == "__main__":
    run_main(main)  # bad input as one `error:` line, as the commands do
