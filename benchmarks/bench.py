"""Speed and memory of mlx_paligemma on full-size random-weight checkpoints, beside mlx-vlm and transformers.

    python benchmarks/bench.py                      # PaliGemma 1 3B-224 and PaliGemma 2 3B-448, bf16/8-bit/4-bit
    python benchmarks/bench.py --models pg1-3b-224 --variants bf16 --tokens 16 --runs 2

It writes a checkpoint of the real architecture in the hub layout (bfloat16, random weights, a tiny tokenizer
from the test fixtures), converts it with convert.py, then measures each variant in a fresh process: load time,
time to first token split into vision tower and prefill, decode tokens/s, peak memory, and decode as a share of
the memory-bandwidth limit (weight bytes read per token / measured bandwidth). A warm-up run comes first (MLX
compiles kernels on first use); figures are medians. mlx-vlm and transformers run on the same weights when installed.
"""

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402  (before mlx: it may load a faster BLAS on Linux)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "paligemma2-tiny"
IMAGE = ROOT / "examples" / "images" / "chelsea.jpg"
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
              num_attention_heads=16, patch_size=14, vision_use_head=False)
MODELS = {
    "pg1-3b-224": dict(image_size=224, text=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384,
                                                 num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                                 head_dim=256)),
    "pg2-3b-448": dict(image_size=448, text=dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216,
                                                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                                 head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}
VARIANTS = {"bf16": None, "8bit": 8, "4bit": 4}


def backend() -> str:
    if mx.default_device() == mx.cpu:
        return f"CPU ({platform.machine()})"
    return "Metal" if platform.system() == "Darwin" else "CUDA"


def write_checkpoint(name: str, folder: Path) -> None:
    """Random bfloat16 weights of the real shapes, named and laid out as on the hub."""
    from mlx_paligemma.formats.loading import load_config
    from mlx_paligemma.models.paligemma import PaliGemma

    spec = MODELS[name]
    tokenizer = json.loads((TOKENIZER / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<image>")
    patches = (spec["image_size"] // 14) ** 2
    config = dict(model_type="paligemma", image_token_index=image_id, vocab_size=257216, projection_dim=spec["text"]["hidden_size"],
                  text_config=dict(spec["text"], vocab_size=257216, num_image_tokens=patches),
                  vision_config=dict(SIGLIP, image_size=spec["image_size"], num_image_tokens=patches,
                                     projection_dim=spec["text"]["hidden_size"]),
                  eos_token_id=1, pad_token_id=0, bos_token_id=2, torch_dtype="bfloat16")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "processor", "preprocessor")):
            shutil.copy(f, tmp / f.name)
    processor = json.loads((tmp / "processor_config.json").read_text())
    processor["image_processor"].update(size={"height": spec["image_size"], "width": spec["image_size"]},
                                        image_seq_length=patches)
    processor["image_seq_length"] = patches
    (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2))

    shapes = dict(tree_flatten(PaliGemma(load_config(tmp)).parameters()))
    shard, size, index, n = {}, 0, {}, 0
    names = list(shapes)
    for i, key in enumerate(names):
        shape = shapes[key].shape
        if key.endswith("patch_embedding.weight"):
            shape = (shape[0], shape[3], shape[1], shape[2])  # OIHW, as PyTorch writes it
        shard[key] = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
        mx.eval(shard[key])
        size += shard[key].nbytes
        if size > 2e9 or i == len(names) - 1:
            n += 1
            file = f"model-{n:05d}.safetensors"
            mx.save_safetensors(str(tmp / file), shard, metadata={"format": "pt"})
            index.update({k: file for k in shard})
            print(f"[bench] {name}: wrote {file} ({size / 1e9:.1f} GB, {i + 1}/{len(names)} tensors)", flush=True)
            shard, size = {}, 0
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tmp.rename(folder)


def bandwidth_gbs() -> float:
    """Memory bandwidth as decoding sees it: one token through a 1 GiB float32 linear layer, which streams the matrix."""
    w, x = mx.random.normal((65536, 4096)), mx.random.normal((1, 4096))
    mx.eval(w, x)
    times = []
    for _ in range(5):
        tic = time.perf_counter()
        mx.eval(x @ w.T)
        times.append(time.perf_counter() - tic)
    return w.nbytes / min(times) / 1e9


def decoder_bytes(model) -> int:
    # Read once per generated token: every decoder weight; the tied embedding serves as the output head.
    return sum(v.nbytes for _, v in tree_flatten(model.language_model.parameters()))


def measure_ours(folder: str, tokens: int, runs: int) -> dict:
    tic = time.perf_counter()
    model, processor = mp.load(folder)
    load_s = time.perf_counter() - tic
    batch = processor(images=str(IMAGE), text="caption en")
    results = []
    for _ in range(runs + 1):  # the first is the warm-up
        mx.reset_peak_memory()
        tic = time.perf_counter()
        features = model.encode_images(batch["pixel_values"])
        mx.eval(features)
        vision = time.perf_counter() - tic
        steps = mp.generate_step(model, batch["input_ids"], image_features=features, max_tokens=tokens)
        next(steps).item()
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        for t in steps:
            t.item()
        results.append(dict(vision=vision, prefill=first - vision, first=first,
                            decode=(tokens - 1) / (time.perf_counter() - tic), peak=mx.get_peak_memory() / 1e9))
    results = results[1:]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    dtype = str(model.language_model.model.norm.weight.dtype).split(".")[-1]
    return dict(load=load_s, weight_gb=decoder_bytes(model) / 1e9, compute_dtype=dtype, **med)


def measure_mlx_vlm(folder: str, tokens: int, runs: int) -> dict:
    from mlx_vlm import load, stream_generate

    tic = time.perf_counter()
    model, processor = load(folder)
    load_s = time.perf_counter() - tic
    results = []
    for _ in range(runs + 1):
        mx.reset_peak_memory()
        tic = time.perf_counter()
        first, n = None, 0
        for r in stream_generate(model, processor, "caption en", image=[str(IMAGE)], max_tokens=tokens):
            n += 1
            if first is None:
                first = time.perf_counter() - tic
                tic2 = time.perf_counter()
        results.append(dict(first=first, decode=(n - 1) / (time.perf_counter() - tic2), peak=mx.get_peak_memory() / 1e9))
    results = results[1:]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    weights = sum(v.nbytes for _, v in tree_flatten(model.language_model.parameters()))
    return dict(load=load_s, weight_gb=weights / 1e9, **med)


def measure_transformers(folder: str, tokens: int, runs: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tic = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    sync()
    load_s = time.perf_counter() - tic
    inputs = processor(images=Image.open(IMAGE), text="caption en", return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)

    class Clock:  # a generate() streamer: put() receives the prompt, then each new token once it is on the host
        def __init__(self):
            self.times = []

        def put(self, _):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    results = []
    with torch.no_grad():
        for _ in range(runs + 1):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            clock = Clock()
            tic = time.perf_counter()
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock)
            first, last = clock.times[1], clock.times[-1]
            peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
            results.append(dict(first=first - tic, decode=(tokens - 1) / max(last - first, 1e-9), peak=peak))
    results = results[1:]
    med = {k: statistics.median(r[k] for r in results) for k in ("first", "decode")}
    return dict(load=load_s, peak=results[-1]["peak"], **med)


MEASURE = {"ours": measure_ours, "mlx-vlm": measure_mlx_vlm, "transformers": measure_transformers}


def run_isolated(kind: str, folder: Path, tokens: int, runs: int):
    """Each measurement in its own process, so load time and peak memory are its own."""
    cmd = [sys.executable, __file__, "--measure", kind, str(folder), "--tokens", str(tokens), "--runs", str(runs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"[bench] {kind} on {folder.name}: {tail}", flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt(x, spec="{:.3f}"):
    return "-" if x is None else spec.format(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "checkpoints"), help="where checkpoints are written")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compare", nargs="*", default=["mlx-vlm", "transformers"], choices=["mlx-vlm", "transformers"])
    p.add_argument("--out", default=None, help="markdown file for the table (default: benchmarks/results-<backend>.md)")
    p.add_argument("--measure", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(MEASURE[args.measure[0]](args.measure[1], args.tokens, args.runs)))
        return

    from mlx_paligemma.convert import convert

    # Peers are optional columns: the benchmark runs with only this project installed.
    import importlib.util
    needs = {"mlx-vlm": ["mlx_vlm"], "transformers": ["transformers", "torch"]}
    missing = [k for k in args.compare if any(importlib.util.find_spec(m) is None for m in needs[k])]
    for k in missing:
        print(f"[bench] {k} is not installed: its rows are left out", flush=True)
    args.compare = [k for k in args.compare if k not in missing]
    work = Path(args.work)
    bw = bandwidth_gbs()
    header = (f"Backend {backend()}, {platform.processor() or platform.machine()}, measured bandwidth {bw:.1f} GB/s, "
              f"{date.today()}, prompt \"caption en\", {args.tokens} tokens, median of {args.runs} after a warm-up.")
    rows = ["| model | implementation | weights | compute | load s | vision s | prefill s | first token s | decode tok/s "
            "| % of bandwidth limit | peak GB |", "|" + " --- |" * 11]
    print(f"[bench] {header}", flush=True)
    for name in args.models:
        hub = work / f"{name}-hf-bf16"
        if not hub.exists():
            write_checkpoint(name, hub)
        for variant in args.variants:
            folder = work / f"{name}-mlx-{variant}"
            if not folder.exists():
                convert(str(hub), str(folder), dtype="bfloat16", quantize_bits=VARIANTS[variant])
            ours = run_isolated("ours", folder, args.tokens, args.runs)
            if ours:
                limit = bw * 1e9 / (ours["weight_gb"] * 1e9)
                rows.append(f"| {name} | mlx_paligemma | {variant} | {ours['compute_dtype']} | {fmt(ours['load'], '{:.1f}')} "
                            f"| {fmt(ours['vision'])} | {fmt(ours['prefill'])} | {fmt(ours['first'])} "
                            f"| {fmt(ours['decode'], '{:.2f}')} | {100 * ours['decode'] / limit:.0f}% | {fmt(ours['peak'], '{:.2f}')} |")
                print(rows[-1], flush=True)
            if "mlx-vlm" in args.compare:
                source = hub if variant == "bf16" else work / f"{name}-mlx-vlm-{variant}"
                if variant != "bf16" and not source.exists():
                    subprocess.run([sys.executable, "-m", "mlx_vlm.convert", "--hf-path", str(hub), "--mlx-path",
                                    str(source), "-q", "--q-bits", str(VARIANTS[variant])], capture_output=True)
                theirs = run_isolated("mlx-vlm", source, args.tokens, args.runs) if source.exists() else None
                if theirs:
                    rows.append(f"| {name} | mlx-vlm | {variant} | | {fmt(theirs['load'], '{:.1f}')} | | "
                                f"| {fmt(theirs['first'])} | {fmt(theirs['decode'], '{:.2f}')} "
                                f"| {100 * theirs['decode'] * theirs['weight_gb'] / bw:.0f}% | {fmt(theirs['peak'], '{:.2f}')} |")
                    print(rows[-1], flush=True)
        if "transformers" in args.compare and "bf16" in args.variants:
            ref = run_isolated("transformers", hub, args.tokens, args.runs)
            if ref:
                rows.append(f"| {name} | transformers | bf16 | bfloat16 | {fmt(ref['load'], '{:.1f}')} | | "
                            f"| {fmt(ref['first'])} | {fmt(ref['decode'], '{:.2f}')} | | {fmt(ref['peak'], '{:.2f}')} |")
                print(rows[-1], flush=True)
    table = header + "\n\n" + "\n".join(rows) + "\n"
    out = Path(args.out or ROOT / "benchmarks" / f"results-{backend().split()[0].lower()}.md")
    out.write_text(table)
    print(table)
    print(f"[bench] saved {out}")


if __name__ == "__main__":
    main()
