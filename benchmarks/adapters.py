"""Many adapters on one base: tokens/s of a batch of 8 rows spread over 1, 2, 4 and 8 LoRA adapters, beside the same
rows all on one adapter, the rows on the base alone, and the adapters run one after the other (a batch per adapter,
as a server holding one adapter at a time would); and the memory each adapter costs.

    python benchmarks/adapters.py                                  # the tiny test model, rank 8 on every linear
    python benchmarks/adapters.py --model pg2-3b-224 --tokens 16   # a full-size random checkpoint (bench.py's)

The adapters are random LoRA factors (ranks 4, 8, 16 in turn, every decoder linear) written as mlx_paligemma.lora
writes them and loaded with load(..., adapters=). Every row makes exactly --tokens tokens (eos does not stop it).
The arms alternate round by round and the table gives medians, since a shared machine drifts within minutes.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "paligemma2-tiny"
ROWS = 8
RANKS = (4, 8, 16)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def write_adapter(model, folder: Path, rank: int, seed: int) -> None:
    """Random LoRA factors on every decoder linear, in mlx-lm's layout."""
    mx.random.seed(seed)
    weights = {}
    params = dict(tree_flatten(model.language_model.parameters()))
    for i in range(len(model.layers)):
        for name in LINEARS:
            prefix = f"model.layers.{i}.{name}"
            out, inp = params[f"{prefix}.weight"].shape
            if f"{prefix}.scales" in params:  # quantized: packed columns
                inp = inp * 32 // model.layers[i].self_attn.q_proj.bits
            weights[f"language_model.{prefix}.lora_a"] = mx.random.normal((inp, rank)) * inp**-0.5
            weights[f"language_model.{prefix}.lora_b"] = mx.random.normal((rank, out)) * 0.01
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": -1,
              "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": list(LINEARS)}}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def run(model, processor, image, rows, tokens: int) -> float:
    """Tokens/s of one engine over `rows` (adapter names, None for the base), every row making `tokens` tokens."""
    engine = mp.Engine(model, processor, batch_size=len(rows))
    for adapter in rows:
        engine.submit(image, "caption en", max_tokens=tokens, stop_at_eos=False, adapter=adapter)
    n, tic = 0, time.perf_counter()
    with engine.running():
        while engine.has_work:
            n += len(engine.step())
    return n / (time.perf_counter() - tic)


def one_after_the_other(model, processor, image, rows, tokens: int) -> float:
    """The rows of each adapter in a batch of their own, the batches in turn: tokens/s over them all."""
    groups = {}
    for adapter in rows:
        groups.setdefault(adapter, []).append(adapter)
    tic = time.perf_counter()
    for group in groups.values():
        run(model, processor, image, group, tokens)
    return len(rows) * tokens / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--tokens", type=int, default=24, help="tokens each row makes")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per arm, after a warm-up")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="adapters the 8 rows spread over")
    args = p.parse_args()
    image = Image.open(ROOT / "tests" / "fixtures" / "images" / "chelsea.jpg").convert("RGB")
    base, processor = mp.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for i in range(max(args.counts)):
            folders[f"a{i}"] = Path(tmp) / f"a{i}"
            write_adapter(base, folders[f"a{i}"], RANKS[i % len(RANKS)], seed=i)
        del base
        mx.clear_cache()
        before = mx.get_active_memory()
        plain, _ = mp.load(args.model)
        base_bytes = mx.get_active_memory() - before
        model, processor = mp.load(args.model, adapters={k: str(v) for k, v in folders.items()})
        adapters_bytes = mx.get_active_memory() - before - 2 * base_bytes  # a second base, and the adapters
    from mlx_paligemma.models.adapters import adapter_set

    info = adapter_set(model).info
    arms = {"base rows (no adapter), base model": lambda: run(plain, processor, image, [None] * ROWS, args.tokens),
            "base rows, adapters loaded": lambda: run(model, processor, image, [None] * ROWS, args.tokens),
            "8 rows on one adapter": lambda: run(model, processor, image, ["a0"] * ROWS, args.tokens)}
    for k in args.counts:
        rows = [f"a{i % k}" for i in range(ROWS)]
        arms[f"8 rows over {k} adapters, one batch"] = lambda rows=rows: run(model, processor, image, rows,
                                                                              args.tokens)
        arms[f"8 rows over {k} adapters, one after the other"] = (
            lambda rows=rows: one_after_the_other(model, processor, image, rows, args.tokens))
    rates = {name: [] for name in arms}
    for round_ in range(args.rounds + 1):
        for name, arm in arms.items():
            rate = arm()
            if round_:  # the first round warms up (kernels, compiled steps)
                rates[name].append(rate)
    print(f"model {args.model}, {ROWS} rows x {args.tokens} tokens, medians of {args.rounds} rounds\n")
    print("| arm | tokens/s |\n|---|---:|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    print(f"\nbase weights: {base_bytes / 2**20:.1f} MiB; {len(info)} adapters: {adapters_bytes / 2**20:.2f} MiB "
          "measured (stacks padded to each layer's largest rank)\n")
    print("| adapter | rank | layers | its factors (MiB) | added by loading it (MiB) |\n|---|---:|---:|---:|---:|")
    for name, a in info.items():
        print(f"| {name} | {a['rank']} | {len(a['layers'])} | {a['bytes'] / 2**20:.3f} | "
              f"{a['added_bytes'] / 2**20:.3f} |")


if __name__ == "__main__":
    main()
