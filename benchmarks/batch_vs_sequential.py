"""A batch of 8 prompts against the same 8 prompts one `generate` call after another, on the tiny Gemma 2 checkpoint
(compare.py's eight prompts about two photos, --tokens tokens each, greedy).

    python benchmarks/batch_vs_sequential.py                 # 3 alternated rounds
    python benchmarks/batch_vs_sequential.py --rounds 5 --tokens 50

Each round times the 8 sequential calls, then the batch, after one warm-up of each; printed: each round's seconds and
ratio (sequential / batch: how many times faster the batch is), and the median ratio. The two sides' answers are
compared (a difference would mean they did different work).
"""

import argparse
import statistics
import time

import mlx_paligemma as mp  # before mlx: it may load a faster BLAS on Linux

from compare import IMAGES, MODEL, PROMPTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=100)
    args = p.parse_args()
    model, processor = mp.load(str(MODEL))
    images = [str(IMAGES / image) for _, image in PROMPTS]
    prompts = [prompt for prompt, _ in PROMPTS]

    def sequential():
        return [mp.generate(model, processor, i, p, max_tokens=args.tokens).text for i, p in zip(images, prompts)]

    def batch():
        return list(mp.batch_generate(model, processor, images, prompts, max_tokens=args.tokens).texts)

    if sequential() != batch():
        raise SystemExit("the batch's answers differ from the sequential ones")
    ratios = []
    for r in range(args.rounds):
        tic = time.perf_counter()
        sequential()
        one_by_one = time.perf_counter() - tic
        tic = time.perf_counter()
        batch()
        together = time.perf_counter() - tic
        ratios.append(one_by_one / together)
        print(f"round {r + 1}: 8 generate calls {one_by_one:.3f} s, batch_generate {together:.3f} s: "
              f"{ratios[-1]:.2f}x", flush=True)
    print(f"median: the batch is {statistics.median(ratios):.2f}x faster than 8 sequential calls")


if __name__ == "__main__":
    main()
