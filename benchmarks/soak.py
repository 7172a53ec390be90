"""A soak of the server on 127.0.0.1: a few hundred mixed good and hostile requests from concurrent clients; the
server's memory before and after, and the worst cost of each kind of request (its own time, and the longest a good
request waited meanwhile).

    python benchmarks/soak.py                           # 300 requests, 8 clients, the tiny test checkpoint
    python benchmarks/soak.py --source /tmp/old-checkout  # the same against another checkout's server
    python benchmarks/soak.py --kinds "32 MiB of {}" --requests 8 --clients 8 --hostile-every 1   # eight at once

It starts `python -m mlx_paligemma.server` itself (from --source), with a small HTTP server of its own that serves
an image, an endless stream and a URL that drips a byte every 2 s. Every request has a client timeout (--timeout),
so a request the server holds longer counts as `timeout` and the soak still ends.
"""

import argparse
import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from serving import served  # benchmarks/serving.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
EOS = 1  # the tiny checkpoints' <eos>


def rss_mib(pid: int) -> tuple:
    """(resident now, resident peak) of a process, MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Targets(BaseHTTPRequestHandler):
    """Fetch targets: /cat.jpg, /endless (bytes forever), /drip (a byte every 2 s)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        try:
            if self.path == "/cat.jpg":
                self.wfile.write((IMAGES / "chelsea.jpg").read_bytes())
            elif self.path == "/endless":
                for _ in range(200_000):  # 13 GB at most: bounded, far beyond any sane cap
                    self.wfile.write(b"\xff" * 65536)
            elif self.path == "/drip":
                for _ in range(60):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(2)
        except OSError:  # the server gave up on it
            pass

    def log_message(self, *args):
        pass


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def body(prompt="caption en", image=None, **kw) -> dict:
    image = image or data_url(IMAGES / "chelsea.jpg")
    return {"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]}], **kw}


def png(width, height) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def kinds(targets: str) -> dict:
    """name -> request body (bytes): the good request and the hostile ones."""
    j = lambda b: json.dumps(b).encode()  # noqa: E731
    return {
        "good": j(body()),
        "malformed JSON": b'{"messages": [',
        "JSON 5000 deep": b"[" * 5000 + b"]" * 5000,
        "stream_options 5": j(body(stream=True, stream_options=5)),
        "temperature a string": j(body(temperature="hot")),
        "stop 1 MB": j(body(stop=["x" * 1_000_000], max_tokens=64)),
        "prompt 30 MB": j(body(prompt="cat " * 7_500_000)),
        "not an image": j(body(image="data:image/png;base64," + base64.b64encode(b"hello").decode())),
        "big image": j(body(image=png(6000, 6000))),
        "max_tokens 4000, eos banned": j(body(max_tokens=4000, logit_bias={str(EOS): -100})),
        "URL endless": j(body(image=targets + "/endless")),
        "URL drip": j(body(image=targets + "/drip")),
        "URL 127.0.0.1 closed port": j(body(image="http://127.0.0.1:9/x.jpg")),
        # Structured output's costs and an image flood, each refused or bounded before the model thread
        # pays for it.
        "choices 1,000,000": j(body(choices=[f"choice {i}" for i in range(1_000_000)])),
        "regex a{100000}": j(body(regex="a{100000}")),
        "regex ((a{100}){100}){100}": j(body(regex="((a{100}){100}){100}")),
        "schema minimum 10**400": j(body(response_format={"type": "json_schema", "json_schema": {"schema": {
            "type": "integer", "minimum": 10**400}}})),
        "four 7000x7000 PNGs": j({"max_tokens": 4, "messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": png(7000, 7000)}}] * 4,
            {"type": "text", "text": "caption en"}]}]}),
        # A body within the 32 MiB limit whose ignored field is ~11 million empty objects (0.8 GB once parsed).
        "32 MiB of {}": j(body())[:-1] + b', "ignored": [' + b"{}," * 11_000_000 + b"{}]}",
    }


def post(url: str, data: bytes, timeout: float):
    """(status or 'timeout'/error name, seconds)."""
    tic = time.perf_counter()
    request = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    except (TimeoutError, socket.timeout):
        status = "timeout"
    except OSError as e:
        status = type(e).__name__
    return status, time.perf_counter() - tic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "paligemma2-tiny"))
    p.add_argument("--source", default=str(ROOT), help="checkout whose server runs")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--hostile-every", type=int, default=3, help="one hostile request in this many")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--server-args", default="", help="extra options for the server, one string")
    p.add_argument("--kinds", default=None, help="the hostile kinds to send, by name, comma-separated (default: all)")
    args = p.parse_args(argv)

    targets = ThreadingHTTPServer(("127.0.0.1", 0), Targets)
    threading.Thread(target=targets.serve_forever, daemon=True).start()
    all_kinds = kinds(f"http://127.0.0.1:{targets.server_address[1]}")
    hostile = [k for k in all_kinds if k != "good" and (args.kinds is None or k in args.kinds.split(","))]
    plan = ["good" if i % args.hostile_every else hostile[(i // args.hostile_every) % len(hostile)]
            for i in range(1, args.requests + 1)]

    with served(args.model, "--log-level", "critical", *args.server_args.split(), source=args.source,
                quiet=True) as (url, server):
        for _ in range(5):  # warm up: compiled steps, caches
            post(url, all_kinds["good"], args.timeout)
        before = rss_mib(server.pid)
        results = defaultdict(list)  # kind -> [(status, seconds, started, ended)]
        lock = threading.Lock()
        t0 = time.perf_counter()

        def one(kind):
            start = time.perf_counter() - t0
            status, seconds = post(url, all_kinds[kind], args.timeout)
            with lock:
                results[kind].append((status, seconds, start, start + seconds))

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, plan))
        wall = time.perf_counter() - t0
        after = rss_mib(server.pid)
        alive = post(url, all_kinds["good"], args.timeout)
    targets.shutdown()

    good = results["good"]
    print(f"{len(plan)} requests ({len(good)} good, {len(plan) - len(good)} hostile) from {args.clients} clients "
          f"in {wall:.1f} s; server from {args.source}")
    print(f"server memory: resident {before[0]:.0f} MiB before, {after[0]:.0f} MiB after, peak {after[1]:.0f} MiB")
    print(f"good requests: {sum(s == 200 for s, *_ in good)}/{len(good)} answered 200, worst latency "
          f"{max((t for _, t, *_ in good), default=0):.2f} s; after the soak a good request gives {alive[0]} in "
          f"{alive[1]:.2f} s")
    print(f"{'kind':32} {'statuses':24} {'worst own s':>11} {'worst good-request s meanwhile':>30}")
    for kind in all_kinds:
        if kind == "good" or not results[kind]:
            continue
        statuses = ",".join(sorted({str(s) for s, *_ in results[kind]}))
        own = max(t for _, t, *_ in results[kind])
        meanwhile = [t for _, t, s, e in good if any(s < e2 and s2 < e for _, _, s2, e2 in results[kind])]
        print(f"{kind:32} {statuses:24} {own:11.2f} {max(meanwhile, default=0):30.2f}")


if __name__ == "__main__":
    main()
