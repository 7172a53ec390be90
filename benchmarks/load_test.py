"""A bounded load test of the server on 127.0.0.1: many requests from concurrent clients, all answered and all
right, peak memory, and the throughput of N concurrent clients against one.

    python benchmarks/load_test.py                      # the tiny test checkpoint: 200 requests, 16 clients
    python benchmarks/load_test.py --model mlx-community/paligemma2-3b-mix-224-bf16 --requests 64 --max-tokens 20

It starts `python -m mlx_paligemma.server` itself, on a free port, and stops it at the end.
1. Answers: one request per distinct prompt, one at a time, gives the expected answers; then --requests requests
   (those prompts in turn, half streamed) from --clients concurrent clients must all come back equal to them.
2. Throughput: answers of exactly --max-tokens tokens (<eos> banned by logit_bias), from one client and then from
   --throughput-clients clients at once; generated tokens per second of wall time.
"""

import argparse
import base64
import json
import resource
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving import served  # benchmarks/serving.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
PROMPTS = [("caption en", "chelsea.jpg"), ("detect cat", "chelsea.jpg"), ("answer en what is this?", "coffee.jpg"),
           ("ocr", "coffee.jpg"), ("describe en", "chelsea.jpg"), ("segment cup", "coffee.jpg"),
           ("caption es", "coffee.jpg"), ("answer en is it a cat?", "chelsea.jpg")]


def messages(prompt, image):
    url = "data:image/jpeg;base64," + base64.b64encode((IMAGES / image).read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def ask(client, model, prompt, image, stream, **kw):
    """(answer, completion tokens, seconds)."""
    tic = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages(prompt, image), **kw)
        return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - tic
    text, tokens = "", 0
    for chunk in client.chat.completions.create(model=model, messages=messages(prompt, image), stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, tokens, time.perf_counter() - tic


def throughput(client, model, clients, requests_each, max_tokens, eos):
    """Generated tokens per second of wall time, `clients` clients each asking `requests_each` times in turn."""
    def one_client(c):
        return sum(ask(client, model, *PROMPTS[(c + i) % len(PROMPTS)], False, max_tokens=max_tokens,
                       logit_bias={str(eos): -100})[1] for i in range(requests_each))

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one_client, range(clients)))
    return tokens / (time.perf_counter() - tic), tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "paligemma2-tiny"))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--throughput-clients", type=int, default=8)
    p.add_argument("--throughput-requests", type=int, default=4, help="requests per client in the throughput runs")
    args = p.parse_args(argv)
    import openai

    from mlx_paligemma.formats.loading import get_model_path

    eos = json.loads((get_model_path(args.model) / "config.json").read_text()).get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) else eos
    with served(args.model, "--batch-size", str(args.batch_size), "--queue-size", "64", "--log-level", "warning",
                start_seconds=600) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        expected = {pi: ask(client, args.model, *pi, False, max_tokens=args.max_tokens)[0] for pi in PROMPTS}
        jobs = [(PROMPTS[i % len(PROMPTS)], i % 2 == 1) for i in range(args.requests)]

        def run(job):
            (prompt, image), stream = job
            try:
                text, _, seconds = ask(client, args.model, prompt, image, stream, max_tokens=args.max_tokens)
                return text == expected[(prompt, image)], seconds, None
            except Exception as e:  # counted as lost, with its reason
                return False, 0.0, f"{type(e).__name__}: {e}"

        tic = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(run, jobs))
        wall = time.perf_counter() - tic
        errors = [r[2] for r in results if r[2]]
        wrong = sum(1 for ok, _, e in results if not ok and not e)
        latencies = sorted(s for _, s, e in results if not e)
        print(f"{args.requests} requests from {args.clients} concurrent clients in {wall:.1f} s: "
              f"{len(results) - len(errors)} answered, {len(errors)} lost, {wrong} different from one-at-a-time")
        if latencies:
            print(f"  latency p50 {statistics.median(latencies):.3f} s, "
                  f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.3f} s")
        for e in sorted(set(errors))[:5]:
            print(f"  lost: {e}")

        one, n1 = throughput(client, args.model, 1, args.throughput_requests * 2, args.max_tokens, eos)
        many, nn = throughput(client, args.model, args.throughput_clients, args.throughput_requests, args.max_tokens,
                              eos)
        print(f"throughput, {args.max_tokens}-token answers: 1 client {one:.1f} tokens/s ({n1} tokens), "
              f"{args.throughput_clients} clients {many:.1f} tokens/s ({nn} tokens): x{many / one:.2f}")
        with urllib.request.urlopen(url + "/health") as r:
            health = json.loads(r.read())
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    print(f"server peak memory: MLX {health['peak_memory_gb']:.3f} GB, process resident {rss:.0f} MiB; "
          f"{health['finished']} answers finished, {health['cancelled']} cancelled")
    if errors or wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
