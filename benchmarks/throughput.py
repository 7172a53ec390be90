"""Throughput of the generation engine: per-token overhead of one stream, and tokens/s and images/s of batches.

    python benchmarks/throughput.py overhead --rounds 5              # tiny model: ours vs mlx-vlm, one stream
    python benchmarks/throughput.py batch --model tests/fixtures/paligemma2-tiny --sizes 1 4 8 16
    python benchmarks/throughput.py batch --model pg1-3b-224 --sizes 1 8 --images 8   # full-size random weights
    python benchmarks/throughput.py decode --sizes 1 8                 # the decode steps alone, tiny model

Every measurement runs in its own process, and the implementations alternate round by round, since a shared
machine drifts by tens of percent within minutes; the tables give medians. A warm-up run comes first in each
process (MLX compiles kernels on first use). `overhead` decodes the test fixtures' tiny PaliGemma 2 (3 layers,
width 64), where per-token Python and graph-building cost is all there is. `batch` captions distinct photos
with up to 20 tokens each (the figures count the tokens made), beside sequential `generate` and, where it runs,
mlx-vlm's batch_generate; full-size names are bench.py's random checkpoints.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402  (before mlx: it may load a faster BLAS on Linux)
import mlx.core as mx  # noqa: E402
from mlx_paligemma.generation.features import feature_cache  # noqa: E402
import numpy as np  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "paligemma2-tiny"
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))
REPEATS = 5  # timed runs per process, after a warm-up; the process reports their median


def photos(n: int):
    """n distinct images: the sample photos, then flipped and rotated copies of them."""
    from PIL import Image, ImageOps

    base = [Image.open(p).convert("RGB") for p in PHOTOS]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        k = i // len(base)
        out.append(im if k == 0 else ImageOps.mirror(im).rotate(90 * k, expand=True))
    return out


# Measurements, each run in a fresh process by `measure`.

def ours_stream(model_path: str, tokens: int) -> dict:
    model, processor = mp.load(model_path)
    image = photos(1)[0]
    rates = []
    for _ in range(REPEATS + 1):  # the first is the warm-up
        n, tic = 0, None
        for r in mp.stream_generate(model, processor, image, "caption en", max_tokens=tokens):
            n += 1
            if tic is None:
                tic = time.perf_counter()
        rates.append((n - 1) / (time.perf_counter() - tic))
    return dict(tps=statistics.median(rates[1:]), tokens=n)


def mlx_vlm_stream(model_path: str, tokens: int) -> dict:
    from mlx_vlm import load, stream_generate

    model, processor = load(model_path)
    image = photos(1)[0]
    rates = []
    for _ in range(REPEATS + 1):
        n, tic = 0, None
        # mlx-vlm takes no logit bias: the random model's greedy answer runs the full length without eos.
        for r in stream_generate(model, processor, "caption en", image=[image], max_tokens=tokens):
            n += 1
            if tic is None:
                tic = time.perf_counter()
        rates.append((n - 1) / (time.perf_counter() - tic))
    return dict(tps=statistics.median(rates[1:]), tokens=n)


def ours_batch(model_path: str, tokens: int, size: int, n_images: int) -> dict:
    model, processor = mp.load(model_path)
    images = photos(n_images)
    mp.batch_generate(model, processor, images[:1], ["caption en"], max_tokens=2)  # warm-up
    feature_cache(model).entries.clear()
    mx.reset_peak_memory()
    tic, made = time.perf_counter(), 0
    if size == 0:  # sequential generate, one prompt after another
        for im in images:
            made += sum(1 for _ in mp.stream_generate(model, processor, im, "caption en", max_tokens=tokens))
    else:
        engine = mp.Engine(model, processor, batch_size=size)
        for im in images:  # a dataset run would keep fewer waiting; the rows and steps are the same
            engine.submit(im, "caption en", max_tokens=tokens)
        with engine.running():
            while engine.has_work:
                made += len(engine.step())
    elapsed = time.perf_counter() - tic
    weights = sum(v.nbytes for _, v in mp_tree_flatten(model.parameters()))
    cfg = model.config.text_config
    prompt_len = processor(images=images[:1], text="caption en")["input_ids"].shape[1]
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt_len + tokens) * 4 * max(size, 1)
    return dict(seconds=elapsed, tps=made / elapsed, ips=n_images / elapsed, tokens=made,
                peak=mx.get_peak_memory() / 1e9, weights=weights / 1e9, kv=kv / 1e9)


def ours_decode(model_path: str, tokens: int, size: int) -> dict:
    """Tokens/s of the decode steps alone (prefill and the first token excluded), `size` rows sharing each step."""
    from mlx_paligemma.generation.engine import Request
    from mlx_paligemma.generation.settings import check_settings

    model, processor = mp.load(model_path)
    inputs = [processor(images=im, text="caption en") for im in photos(size)]
    rates = []
    for _ in range(REPEATS + 1):  # the first is the warm-up
        engine = mp.Engine(model, processor, batch_size=size)
        for x in inputs:  # eos ignored: every row runs the full length, so the batch stays `size` wide
            engine.add(Request(np.array(x["input_ids"])[0].tolist(), pixel_values=np.array(x["pixel_values"]),
                               settings=check_settings(max_tokens=tokens), stop_at_eos=False))
        made, tic = 0, None
        with engine.running():
            while engine.has_work:
                outputs = engine.step()
                if tic is None:
                    tic = time.perf_counter()  # after the prefill step
                else:
                    made += len(outputs)
        rates.append(made / (time.perf_counter() - tic))
    return dict(tps=statistics.median(rates[1:]))


def mlx_vlm_batch(model_path: str, tokens: int, size: int, n_images: int) -> dict:
    from mlx_vlm import batch_generate, load

    model, processor = load(model_path)
    images = photos(n_images)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    made = 0
    for start in range(0, n_images, size):
        chunk = images[start : start + size]
        r = batch_generate(model, processor, images=chunk, prompts=["caption en"] * len(chunk), max_tokens=tokens)
        made += r.stats.generation_tokens if hasattr(r, "stats") else len(chunk) * tokens
    elapsed = time.perf_counter() - tic
    return dict(seconds=elapsed, tps=made / elapsed, ips=n_images / elapsed, tokens=made,
                peak=mx.get_peak_memory() / 1e9)


def mp_tree_flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


MEASURE = {"ours-stream": ours_stream, "mlx-vlm-stream": mlx_vlm_stream, "ours-batch": ours_batch,
           "mlx-vlm-batch": mlx_vlm_batch, "ours-decode": ours_decode}


def measure(kind: str, *args):
    cmd = [sys.executable, __file__, "--measure", kind, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"[throughput] {kind} {args}: {tail}", file=sys.stderr, flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def model_folder(name: str, work: Path) -> str:
    if Path(name).is_dir():
        return name
    import bench

    folder = work / f"{name}-bf16"
    if not (folder / "config.json").is_file():
        bench.write_checkpoint(name, folder)
    return str(folder)


def mlx_vlm_copy(folder: Path, work: Path) -> Path:
    """The fixture with its vision weights under `vision_tower.vision_model.*`: mlx-vlm 0.7 does not read the
    layout transformers 5.24 writes (`vision_tower.*`)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from safetensors import safe_open

    names = []
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(file, "numpy") as f:
            names += list(f.keys())
    if not any(k.startswith("vision_tower.") and ".vision_model." not in k for k in names):
        return folder
    out = work / f"{folder.name}-mlx-vlm"
    if not (out / "model.safetensors").is_file():
        shutil.copytree(folder, out, dirs_exist_ok=True)
        weights = load_file(folder / "model.safetensors")
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") and
                    not k.startswith("vision_tower.vision_model.") else k): v for k, v in weights.items()}
        save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def have(module: str) -> bool:
    """Peers are optional columns: the benchmark runs with only this project installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"[throughput] {module} is not installed: its column stays empty", file=sys.stderr, flush=True)
        return False
    return True


def median(values, fmt: str = ".1f") -> str:
    return format(statistics.median(values), fmt) if values else "-"


def overhead(args) -> None:
    ours, theirs, ratios = [], [], []
    theirs_folder = mlx_vlm_copy(TINY, Path(args.work)) if have("mlx_vlm") else None
    for n in range(args.rounds):
        a = measure("ours-stream", TINY, args.tokens)
        b = measure("mlx-vlm-stream", theirs_folder, args.tokens) if theirs_folder else None
        line = f"round {n + 1}: ours " + (f"{a['tps']:.1f} tokens/s ({a['tokens']} tokens)" if a else "failed")
        if a:
            ours.append(a["tps"])
        if b:
            theirs.append(b["tps"])
            line += f", mlx-vlm {b['tps']:.1f} tokens/s ({b['tokens']} tokens)"
        if a and b:
            ratios.append(a["tps"] / b["tps"])
        print(line, flush=True)
    print(f"\nsingle stream, tiny PaliGemma 2, {args.tokens} tokens, {args.rounds} alternated rounds, "
          f"{mx.default_device()}:")
    print(f"ours median {median(ours)} tokens/s, mlx-vlm median {median(theirs)} tokens/s, "
          f"median ratio {median(ratios, '.2f')}x")


def batch(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    folder = model_folder(args.model, Path(args.work))
    kinds = [("sequential generate", "ours-batch", 0)] + [(f"batch {s}", "ours-batch", s) for s in args.sizes]
    if args.mlx_vlm and have("mlx_vlm"):
        kinds += [(f"mlx-vlm batch {s}", "mlx-vlm-batch", s) for s in args.sizes]
    wanted = any(kind == "mlx-vlm-batch" for _, kind, _ in kinds)
    theirs = mlx_vlm_copy(Path(folder), Path(args.work)) if wanted else None
    results = {name: [] for name, _, _ in kinds}
    for n in range(args.rounds):
        for name, kind, size in kinds:
            r = measure(kind, theirs if kind.startswith("mlx-vlm") else folder, args.tokens, size, args.images)
            if r:
                results[name].append(r)
                print(f"round {n + 1} {name}: {r['tps']:.2f} tok/s, {r['ips']:.3f} images/s, peak {r['peak']:.3f} GB",
                      flush=True)
    print(f"\n{Path(folder).name}: {args.images} captions of {args.tokens} tokens, medians of {args.rounds} "
          f"alternated rounds, {mx.default_device()}\n")
    print("| run | tokens/s | images/s | vs sequential | peak GB | weights + KV GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    sequential = results["sequential generate"]
    base = statistics.median(r["tps"] for r in sequential) if sequential else None
    for name, rs in results.items():
        if not rs:
            print(f"| {name} | failed | | | | |")
            continue
        tps = statistics.median(r["tps"] for r in rs)
        ips = statistics.median(r["ips"] for r in rs)
        peak = statistics.median(r["peak"] for r in rs)
        need = f"{rs[0]['weights'] + rs[0]['kv']:.3f}" if "weights" in rs[0] else "-"
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {name} | {tps:.2f} | {ips:.3f} | {ratio} | {peak:.3f} | {need} |")


def decode(args) -> None:
    results = {size: [] for size in args.sizes}
    for n in range(args.rounds):
        for size in args.sizes:
            r = measure("ours-decode", args.model, args.tokens, size)
            if r:
                results[size].append(r["tps"])
                print(f"round {n + 1} batch {size}: {r['tps']:.1f} decode tokens/s", flush=True)
    base = statistics.median(results[args.sizes[0]]) if results[args.sizes[0]] else None
    print(f"\ndecode steps only, {Path(args.model).name}, {args.tokens} tokens a row, medians of {args.rounds} "
          f"alternated rounds, {mx.default_device()}:")
    for size, rates in results.items():
        ratio = f" ({statistics.median(rates) / base:.2f}x batch {args.sizes[0]})" if rates and base else ""
        print(f"batch {size}: {median(rates)} tokens/s{ratio}")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        kind, *rest = sys.argv[2:]
        args = [rest[0]] + [int(x) for x in rest[1:]]
        print(json.dumps(MEASURE[kind](*args)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--tokens", type=int, default=200)
    o.add_argument("--rounds", type=int, default=5)
    o.add_argument("--work", default=str(ROOT / "benchmarks" / "checkpoints"))
    b = sub.add_parser("batch")
    b.add_argument("--model", default=str(TINY), help="a model folder, or pg1-3b-224 / pg2-3b-448 (random weights)")
    b.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    b.add_argument("--images", type=int, default=16)
    b.add_argument("--tokens", type=int, default=20)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--mlx-vlm", action="store_true", help="also mlx-vlm's batch_generate")
    b.add_argument("--work", default=str(ROOT / "benchmarks" / "checkpoints"))
    d = sub.add_parser("decode")
    d.add_argument("--model", default=str(TINY))
    d.add_argument("--sizes", type=int, nargs="+", default=[1, 8])
    d.add_argument("--tokens", type=int, default=100)
    d.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    {"overhead": overhead, "batch": batch, "decode": decode}[args.mode](args)


if __name__ == "__main__":
    main()
