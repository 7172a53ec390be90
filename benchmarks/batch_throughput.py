"""Images/s of the dataset runner, `python -m mlx_paligemma.batch`, at several batch sizes.

    python benchmarks/batch_throughput.py --model pg1-3b-224 --images 8 --batch-sizes 1 8
    python benchmarks/batch_throughput.py --model tests/fixtures/paligemma2-tiny --images 64 --batch-sizes 1 8

Captions (`caption en`, --max-tokens 20) of a folder of distinct images: the sample photos, then mirrored and
rotated copies, so the feature cache never spares a vision run. Each run is the command line in a fresh process;
its own summary gives the rate, counted from the first item to the last (model loading excluded). Batch sizes
alternate round by round, since a shared machine drifts within minutes. --model is a folder or hub id, or a
bench.py name (pg1-3b-224, ...) whose full-size random checkpoint is written once to --work.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))
SUMMARY = re.compile(r"(\d+) items \((\d+) answers, (\d+) errors\) in \S+: ([\d.e+-]+) items/s, ([\d.e+-]+) tokens/s")


def write_photos(folder: Path, n: int) -> None:
    from PIL import Image, ImageOps

    base = [Image.open(p).convert("RGB") for p in PHOTOS]
    for i in range(n):
        image, turn = base[i % len(base)], i // len(base)
        if turn:
            image = ImageOps.mirror(image).rotate(90 * turn, expand=True)
        image.save(folder / f"{i:04d}.jpg", quality=95)


def run(model: str, images: Path, batch_size: int, max_tokens: int, out: Path) -> dict:
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "mlx_paligemma.batch", "--model", model, "--input", str(images),
               "--output", str(out), "--prompt", "caption en", "--max-tokens", str(max_tokens),
               "--batch-size", str(batch_size)]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    found = SUMMARY.search(r.stderr)
    if r.returncode or not found:
        sys.exit(f"batch size {batch_size} failed:\n{r.stderr}")
    items, answers, errors, items_s, tokens_s = found.groups()
    return {"items": int(items), "errors": int(errors), "items_s": float(items_s), "tokens_s": float(tokens_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "checkpoints"))
    args = p.parse_args()

    model = args.model
    if not Path(model).exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench import MODELS, write_checkpoint

        if model in MODELS:
            folder = Path(args.work) / model
            if not (folder / "config.json").is_file():
                write_checkpoint(model, folder)
            model = str(folder)
    rates = {b: [] for b in args.batch_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        write_photos(images, args.images)
        for _ in range(args.rounds):
            for b in args.batch_sizes:
                result = run(model, images, b, args.max_tokens, Path(tmp) / "out.jsonl")
                assert result["items"] == args.images and not result["errors"], result
                rates[b].append(result)
                print(f"batch {b}: {result['items_s']:.2f} images/s, {result['tokens_s']:.1f} tokens/s", flush=True)
    print(f"\n{Path(model).name}, {args.images} images, {args.max_tokens}-token captions, median of {args.rounds}:")
    print("| batch size | images/s | tokens/s |\n| --- | --- | --- |")
    for b, runs in rates.items():
        print(f"| {b} | {statistics.median(r['items_s'] for r in runs):.2f} | "
              f"{statistics.median(r['tokens_s'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
