"""Full-size numerics: the project's float32 and bfloat16 logits against transformers' float32 and bfloat16.

    python benchmarks/numerics.py                                  # pg2-3b-224, pg1-3b-224, pg2-3b-448
    python benchmarks/numerics.py --models pg2-3b-224 --work /tmp/numerics

Needs torch and transformers beside the project (CI's reference environment). For each model, transformers writes
a checkpoint of the real shapes with random weights (seed 0; every matrix, embedding and conv drawn from
N(0, 0.02), biases from N(0, 0.02), Gemma's RMSNorm w (used as 1 + w) from N(0, 0.1), SigLIP's LayerNorm weights
from 1 + N(0, 0.1): with these the logits spread over a few units and attention is far from uniform, as in the
trained models; the norms are not left at their constant start, which hides how a port rounds 1 + w). PaliGemma 2
is stored in bfloat16 and PaliGemma 1 in float32, as on the hub. The input is a real photo with "caption en" and a
suffix, so 8 positions are teacher-forced: the last prefix position (the first answer token's logits) and the
next 7. Then four runs, each in its own process to bound memory (~13 GB for a 3B in float32, one at a time):
transformers in float32 with eager attention (the reference), transformers in bfloat16 (eager), the project in
float32 and in bfloat16. The table gives max and mean |logit - reference| at the first position and over the 8,
and how many of the 8 argmaxes agree. Checked: the project's float32 within 1e-4 of the reference, and its
bfloat16 error no larger than transformers' own bfloat16 error (max, at the first position and over the 8).
Exit status 1 when a check fails. The checkpoint is deleted afterwards unless --keep.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402  (before mlx: it may load a faster BLAS on Linux)
import numpy as np  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "paligemma2-tiny"  # any ids do with random weights
IMAGE = ROOT / "tests" / "fixtures" / "images" / "chelsea.jpg"
PROMPT, SUFFIX = "caption en", "a small kitten sitting on a sofa next to a window"
POSITIONS = 8
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
              num_attention_heads=16, patch_size=14, vision_use_head=False)
GEMMA = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
             num_attention_heads=8, num_key_value_heads=1, head_dim=256)
GEMMA2 = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
MODELS = {  # name: (image size, decoder, dtype stored)
    "pg2-3b-224": (224, GEMMA2, "bfloat16"),
    "pg1-3b-224": (224, GEMMA, "float32"),
    "pg2-3b-448": (448, GEMMA2, "bfloat16"),
}
RUNS = ["hf-float32", "hf-bfloat16", "ours-float32", "ours-bfloat16"]
NEEDS_GB = {"float32": 14, "bfloat16": 8}  # free memory to wait for before a run (3B + activations)


def write(name: str, folder: Path) -> None:
    """The checkpoint, with tokenizer files so the project's processor reads it, and the inputs."""
    import torch
    import transformers
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    transformers.logging.set_verbosity_error()
    size, text, dtype = MODELS[name]
    tokens = json.loads((TOKENIZER / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tokens["added_tokens"] if t["content"] == "<image>")
    patches = (size // 14) ** 2
    hidden = text["hidden_size"]
    config = PaliGemmaConfig(
        text_config=dict(text, vocab_size=257216, num_image_tokens=patches),
        vision_config=dict(SIGLIP, image_size=size, projection_dim=hidden), projection_dim=hidden,
        hidden_size=hidden, vocab_size=257216, image_token_index=image_id, pad_token_id=0, bos_token_id=2,
        eos_token_id=1)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0, 0.02)
            elif "vision" in key and "norm" in key and key.endswith("weight"):
                param.normal_(1, 0.1)
            elif "norm" in key:
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    del model
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "processor", "preprocessor")):
            shutil.copy(f, folder / f.name)
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["image_processor"].update(size={"height": size, "width": size}, image_seq_length=patches)
    processor["image_seq_length"] = patches
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))

    from PIL import Image
    from mlx_paligemma.formats.mlx import load_config
    from mlx_paligemma.processing.processor import PaliGemmaProcessor

    proc = PaliGemmaProcessor.from_pretrained(folder, load_config(folder))
    batch = proc(images=[Image.open(IMAGE)], text=PROMPT, suffix=SUFFIX)
    arrays = {k: np.array(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    first = int((arrays["token_type_ids"][0] == 0).sum()) - 1  # the last prefix position
    assert arrays["input_ids"].shape[1] >= first + POSITIONS, "the suffix is too short"
    np.savez(folder / "inputs.npz", first=first, **arrays)


def run(kind: str, folder: Path, out: Path) -> None:
    """Logits at the 8 positions, in float32, from one implementation in one dtype."""
    inputs = np.load(folder / "inputs.npz")
    first = int(inputs["first"])
    keep = inputs["input_ids"].shape[1] - first  # logits for the last `keep` positions: the 8 come first
    impl, dtype = kind.split("-")
    start = time.perf_counter()
    if impl == "hf":
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        model = PaliGemmaForConditionalGeneration.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(inputs["input_ids"]),
                pixel_values=torch.from_numpy(inputs["pixel_values"]).permute(0, 3, 1, 2).to(getattr(torch, dtype)),
                attention_mask=torch.from_numpy(inputs["attention_mask"]),
                token_type_ids=torch.from_numpy(inputs["token_type_ids"]), logits_to_keep=keep,
            ).logits.float().numpy()
    else:
        import mlx.core as mx

        model, _ = mp.load(str(folder), dtype=getattr(mx, dtype))
        logits = model(mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"]),
                       attention_mask=mx.array(inputs["attention_mask"]),
                       token_type_ids=mx.array(inputs["token_type_ids"]), logits_to_keep=keep)
        logits = np.array(logits.astype(mx.float32))
    np.savez(out, logits=logits[0, :POSITIONS], seconds=time.perf_counter() - start)


def free_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")  # not Linux: trust the caller


def wait_for_memory(gb: float, patience: float) -> None:
    deadline = time.monotonic() + patience
    while free_gb() < gb:
        if time.monotonic() > deadline:
            sys.exit(f"numerics: {gb:.0f} GB of free memory needed, {free_gb():.1f} GB free after {patience:.0f} s")
        print(f"[numerics] waiting for {gb:.0f} GB free ({free_gb():.1f} GB now)", flush=True)
        time.sleep(20)


def child(*args) -> None:
    subprocess.run([sys.executable, __file__, *map(str, args)], check=True)


def compare(name: str, folder: Path) -> bool:
    logits = {kind: np.load(folder / f"{kind}.npz") for kind in RUNS}
    ref = logits["hf-float32"]["logits"]
    rows, err = [], {}
    for kind in RUNS[1:]:
        diff = np.abs(logits[kind]["logits"] - ref)
        err[kind] = (diff[0].max(), diff.max())
        agree = int((logits[kind]["logits"].argmax(-1) == ref.argmax(-1)).sum())
        rows.append(f"| {name} | {kind} | {diff[0].max():.2e} | {diff[0].mean():.2e} | {diff.max():.2e} | "
                    f"{diff.mean():.2e} | {agree}/{POSITIONS} | {float(logits[kind]['seconds']):.0f} |")
    ratio = [o / h for o, h in zip(err["ours-bfloat16"], err["hf-bfloat16"])]
    print("| model | run | max first | mean first | max 8 | mean 8 | argmax | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"{name}: ours-bfloat16 / hf-bfloat16 max error: first {ratio[0]:.2f}x, over {POSITIONS} {ratio[1]:.2f}x; "
          f"reference |logits| up to {np.abs(ref).max():.1f}", flush=True)
    ok = err["ours-float32"][1] <= 1e-4 and max(ratio) <= 1.0
    print(f"{name}: {'ok' if ok else 'FAILED'} (float32 within 1e-4, bfloat16 at most 1.0x transformers')")
    return ok


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("_write", "_run"):
        return write(sys.argv[2], Path(sys.argv[3])) if sys.argv[1] == "_write" else \
            run(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlx-paligemma-numerics"),
                        help="folder for the checkpoints (a 3B takes 6 GB in bfloat16, 12 GB in float32)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and logits")
    parser.add_argument("--patience", type=float, default=600, help="seconds to wait for free memory")
    args = parser.parse_args()
    ok = True
    for name in args.models:
        folder = args.work / name
        if not (folder / "inputs.npz").exists():
            shutil.rmtree(folder, ignore_errors=True)
            wait_for_memory(NEEDS_GB[MODELS[name][2]], args.patience)
            start = time.perf_counter()
            child("_write", name, folder)
            print(f"[numerics] {name}: checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        for kind in RUNS:
            if not (folder / f"{kind}.npz").exists():
                wait_for_memory(NEEDS_GB[kind.split("-")[1]], args.patience)
                child("_run", kind, folder, folder / f"{kind}.npz")
                print(f"[numerics] {name}: {kind} done", flush=True)
        ok &= compare(name, folder)
        if not args.keep:
            shutil.rmtree(folder)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
