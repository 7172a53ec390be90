"""The most memory one adapter at the rank limit adds beside a base (docs/ADAPTERS.md): measured on a model folder
(default: the tiny test model), then worked out for PaliGemma's decoders from their shapes.

Each layer's adapters are stacked, padded to the largest rank there, slot 0 all zeros (models/adapters.py). So an
adapter adds the most when it comes last of MAX_ADAPTERS onto MAX_ADAPTERS - 1 adapters of rank 1 on the same
linears: it pads every one of them to its own rank. Alone, it adds its factors and the zero slot, twice its factors.

    python benchmarks/adapter_memory.py [--model tests/fixtures/paligemma2-tiny] [--rank 256]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402  (first: it gives MLX's CPU backend OpenBLAS)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_paligemma import limits  # noqa: E402
from mlx_paligemma.models.adapters import MAX_ADAPTERS, add_adapter, stacked_bytes  # noqa: E402

# Decoders: hidden, MLP width, layers, heads, KV heads, head_dim (the published configs).
DECODERS = {"paligemma-3b": (2048, 16384, 18, 8, 1, 256), "paligemma2-3b": (2304, 9216, 26, 8, 4, 256),
            "paligemma2-10b": (3584, 14336, 42, 16, 8, 256), "paligemma2-28b": (4608, 36864, 46, 32, 16, 128)}
FLOAT32 = 4  # mlx_paligemma.lora writes float32 factors
SLOTS = (MAX_ADAPTERS + 1) * 4  # each stack's int32 table of slots


def linears(hidden, mlp, layers, heads, kv_heads, head_dim):
    """(in, out) of every decoder linear."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)] * layers


def worked_out(dims, rank):
    """(its factors, added alone, added as the last of MAX_ADAPTERS onto rank-1 adapters), in bytes."""
    per_rank = sum(i + o for i, o in dims) * FLOAT32
    others = MAX_ADAPTERS - 1
    alone = 2 * rank * per_rank + len(dims) * (2 * 4 + SLOTS)
    last = (others + 2) * rank * per_rank + len(dims) * 4 - (others + 1) * per_rank
    return rank * per_rank, alone, last


def factors(dims_by_path, rank, seed):
    mx.random.seed(seed)
    return {f"{path}.{leaf}": mx.random.normal(shape) * 0.01 for path, (i, o) in dims_by_path.items()
            for leaf, shape in (("lora_a", (i, rank)), ("lora_b", (rank, o)))}


def measured(model_path, rank):
    """Loaded for real: (its factors, added alone, added last) by the stacks' bytes, and MLX's memory for each of
    alone and last: (active memory added, its peak while loading), both over what was held before."""
    def fresh():
        model, _ = mp.load(model_path)
        dims = {p: (m.weight.shape[1], m.weight.shape[0]) for p, m in model.named_modules()
                if isinstance(m, nn.Linear) and p.startswith("language_model.model.layers.")}
        return model, dims

    def add(model, name, weights):
        mx.eval(weights)
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        info = add_adapter(model, name, weights, 1.0)
        mx.eval(model.parameters())
        return info, (mx.get_active_memory() - before, mx.get_peak_memory() - before)

    model, dims = fresh()
    info, memory_alone = add(model, "alone", factors(dims, rank, 0))
    alone = info["added_bytes"]
    model, dims = fresh()
    for i in range(MAX_ADAPTERS - 1):
        add_adapter(model, f"r1-{i}", factors(dims, 1, i + 1), 1.0)
    mx.eval(model.parameters())
    before = stacked_bytes(model)
    info, memory_last = add(model, "last", factors(dims, rank, 0))
    assert stacked_bytes(model) - before == info["added_bytes"]
    return dims, (info["bytes"], alone, info["added_bytes"]), (memory_alone, memory_last)


def mib(n):
    return f"{n / 2**20:,.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "paligemma2-tiny"))
    p.add_argument("--rank", type=int, default=limits.LIMITS.max_adapter_rank)
    args = p.parse_args()
    limits.configure(max_adapter_rank=args.rank, max_adapter_bytes=2**62)  # the stacks' cap out of the way
    dims, got, memory = measured(args.model, args.rank)
    expected = worked_out(list(dims.values()), args.rank)
    assert got == expected, (got, expected)
    cap = limits.Limits().max_adapter_bytes
    print(f"rank {args.rank} on every decoder linear, float32 factors; MiB; the stacks' default cap "
          f"(--max-adapter-bytes) {mib(cap)} MiB\n")
    print("| decoder | its factors | added alone | added last of 16 (onto 15 of rank 1) |")
    print("|---|---:|---:|---:|")
    print(f"| {Path(args.model).name} (measured) | {' | '.join(mib(n) for n in got)} |")
    for name, shape in DECODERS.items():
        print(f"| {name} | {' | '.join(mib(n) for n in worked_out(linears(*shape), args.rank))} |")
    print()
    name = Path(args.model).name
    for arm, (active, peak) in zip(("alone", "last"), memory):
        print(f"{name}, {arm}: MLX's active memory added {mib(active)} MiB, at its peak while loading "
              f"{mib(peak)} MiB")


if __name__ == "__main__":
    main()
