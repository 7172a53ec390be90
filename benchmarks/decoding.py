"""The cost of beam search, best-of-n and batch-invariant decoding beside greedy, and how often a seeded answer changes
with the batch it shares outside that mode.

    python benchmarks/decoding.py speed --model tests/fixtures/paligemma2-tiny --prompts 8 --tokens 24
    python benchmarks/decoding.py seeded --model tests/fixtures/paligemma2-tiny --prompts 400 --tokens 24

`speed`: tokens/s of batch_generate on the same prompts (8 rows share the steps): greedy, beams 2/3/5 and best_of
2/4 (a beam search or a best_of counts the tokens of its best answer, as it returns them) and greedy with
deterministic=True; medians
of --rounds timed runs after a warm-up. `seeded`: the same seeded sampled prompts (seed i for prompt i) decoded
with batch sizes 1 and 8, and how many answers differ, in the default mode and in deterministic mode.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_paligemma as mp  # noqa: E402  (before mlx: it may load a faster BLAS on Linux)
from mlx_paligemma.generation.engine import Engine

IMAGES = sorted((ROOT / "tests" / "fixtures" / "images").glob("*.*"))
PROMPTS = ["caption en", "describe en", "answer en what is this?", "ocr", "detect cat ; dog"]


def jobs(n: int):
    return [(str(IMAGES[i % len(IMAGES)]), PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def decode(model, processor, items, tokens, batch_size=8, deterministic=False, **settings):
    """(tokens made, seconds, answers' tokens by prompt)."""
    engine = Engine(model, processor, batch_size=batch_size, deterministic=deterministic)
    made = {}
    tic = time.perf_counter()
    each = settings.get("each", {})
    uids = [engine.submit(image, prompt, max_tokens=tokens, **(each(i) if callable(each) else each))
            for i, (image, prompt) in enumerate(items)]
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                made.setdefault(out.uid, []).extend(out.sequences[0].tokens if out.sequences else [out.token])
    seconds = time.perf_counter() - tic
    return sum(map(len, made.values())), seconds, [made[u] for u in uids]


def speed(args, model, processor):
    items = jobs(args.prompts)
    modes = [("greedy", {}, False)] + [(f"beams {n}", dict(num_beams=n), False) for n in (2, 3, 5)]
    modes += [(f"best_of {n} (temperature 1)", dict(best_of=n, temperature=1.0, seed=0), False) for n in (2, 4)]
    modes += [("greedy, deterministic", {}, True)]
    print(f"{args.prompts} prompts, {args.tokens} tokens at most, batch size 8, {args.model}")
    print("| decoding | tokens/s | x greedy |\n|---|---|---|")
    base = None
    for name, settings, invariant in modes:
        decode(model, processor, items, 4, deterministic=invariant, each=settings)  # warm-up (compiles)
        rates = []
        for _ in range(args.rounds):
            n, s, _ = decode(model, processor, items, args.tokens, deterministic=invariant, each=settings)
            rates.append(n / s)
        rate = statistics.median(rates)
        base = base or rate
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |", flush=True)


def seeded(args, model, processor):
    items = jobs(args.prompts)
    each = lambda i: dict(temperature=1.0, top_p=0.95, seed=i)  # noqa: E731
    for invariant in (False, True):
        answers = [decode(model, processor, items, args.tokens, batch_size=b, deterministic=invariant,
                          each=each)[2] for b in (1, 8)]
        changed = sum(a != b for a, b in zip(*answers))
        print(f"deterministic={invariant}: {changed} of {len(items)} seeded answers differ between batch sizes "
              "1 and 8", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=("speed", "seeded"))
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "paligemma2-tiny"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, processor = mp.load(args.model)
    (speed if args.what == "speed" else seeded)(args, model, processor)


if __name__ == "__main__":
    main()
