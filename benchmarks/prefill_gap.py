"""How long a streaming answer waits between two tokens while a long prompt arrives beside it, and what that costs
the long prompt: the server on 127.0.0.1, the tiny Gemma 2 checkpoint.

    python benchmarks/prefill_gap.py                          # the default --prefill-budget
    python benchmarks/prefill_gap.py --budgets 0.02 0.1 0.5   # the trade-off, one server per budget
    python benchmarks/prefill_gap.py --source /tmp/old        # another checkout (its server, its flags)

For each budget: client A streams a long answer (its <eos> banned by logit_bias, so it runs to max_tokens); once it
flows, client B sends one image and a prompt of ~--words tokens for one token. Printed: A's worst gap between two
tokens while B was under way (and A's median gap alone), B's time to its answer, and B's time alone on an idle
server. Each figure is the median of --repeats rounds.
"""

import argparse
import base64
import http.client
import json
import statistics
import threading
import time
from pathlib import Path

from serving import served

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "paligemma2-tiny"
IMAGE = ROOT / "tests" / "fixtures" / "images" / "chelsea.jpg"
TIMEOUT_S = 300


def image_part() -> dict:
    data = base64.b64encode(IMAGE.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}


def post(url: str, body: dict) -> http.client.HTTPResponse:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


def stream_times(url: str, max_tokens: int, times: list, started: threading.Event) -> None:
    """Client A: the arrival time of each streamed piece."""
    body = {"model": "m", "stream": True, "max_tokens": max_tokens, "logit_bias": {"1": -100},
            "messages": [{"role": "user", "content": [image_part(), {"type": "text", "text": "caption en"}]}]}
    response = post(url, body)
    for line in response:
        if line.startswith(b"data: {"):
            times.append(time.monotonic())
            if len(times) == 5:
                started.set()
    started.set()


def long_prompt(url: str, words: int) -> tuple:
    """Client B: (seconds to the answer, prompt tokens)."""
    body = {"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": [image_part(), {"type": "text", "text": "caption en " + "cat " * words}]}]}
    tic = time.monotonic()
    response = post(url, body)
    answer = json.loads(response.read())
    if response.status != 200:
        raise SystemExit(f"the long prompt was refused: {answer}")
    return time.monotonic() - tic, answer["usage"]["prompt_tokens"]


def round_with_stream(url: str, words: int, max_tokens: int) -> tuple:
    times, started = [], threading.Event()
    a = threading.Thread(target=stream_times, args=(url, max_tokens, times, started))
    a.start()
    started.wait(TIMEOUT_S)
    begin = time.monotonic()
    took, tokens = long_prompt(url, words)
    end = time.monotonic()
    a.join(TIMEOUT_S)
    during = [t for t in times if begin <= t <= end + 1]
    before = [t for t in times if t < begin]
    gaps = [b - a for a, b in zip(during, during[1:])]
    if during and before:
        gaps.append(during[0] - before[-1])
    alone = [b - a for a, b in zip(before, before[1:])]
    if len(times) and times[-1] < end:
        raise SystemExit("the stream ended before the long prompt was answered: raise --stream-tokens")
    return max(gaps), statistics.median(alone) if alone else float("nan"), took, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="*", type=float, default=[None], help="--prefill-budget values (default: "
                                                                            "the server's default)")
    p.add_argument("--words", type=int, default=7800, help="words of the long prompt (a token each)")
    p.add_argument("--stream-tokens", type=int, default=4000, help="max_tokens of the streamed answer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--source", default=None, help="a checkout to serve instead of this one")
    args = p.parse_args()
    print("| --prefill-budget | A's worst gap (s) | A's median gap (s) | B beside A (s) | B alone (s) | B/alone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for budget in args.budgets:
        options = ["--log-level", "warning", "--max-tokens-limit", str(args.stream_tokens)] + (
            [] if budget is None else ["--prefill-budget", str(budget)])
        with served(str(MODEL), *options, source=args.source, quiet=True) as (url, _):
            long_prompt(url, args.words)  # warm-up: kernels compiled, the image's features cached
            alone = statistics.median(long_prompt(url, args.words)[0] for _ in range(args.repeats))
            rounds = [round_with_stream(url, args.words, args.stream_tokens) for _ in range(args.repeats)]
        worst, median_gap, beside = (statistics.median(r[i] for r in rounds) for i in range(3))
        print(f"| {'default' if budget is None else budget} | {worst:.3f} | {median_gap:.4f} | {beside:.2f} | "
              f"{alone:.2f} | {beside / alone:.2f} |  ({rounds[0][3]} prompt tokens)", flush=True)


if __name__ == "__main__":
    main()
