"""An image flood against the server on 127.0.0.1: concurrent clients each send one request with four large PNGs
(small on the wire: one colour), and the server's resident memory is read from /proc (Linux) before, at its peak
(VmHWM) and after. Meanwhile an innocent client sends a request of one small picture, again and again until the
flood is over: how long it waits, against the same request on the idle server.

    python benchmarks/image_flood.py                              # 8 clients, 7000x7000 PNGs, the tiny checkpoint
    python benchmarks/image_flood.py --clients 48
    python benchmarks/image_flood.py --source /tmp/old-checkout    # the same against another checkout's server

docs/SERVER.md gives its figures: the server's decoding stays within --decode-budget-bytes (400 MB) however many
clients send images at once, gives the memory back when they are done, and a small request is not queued behind
the flood.
"""

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from serving import served  # benchmarks/serving.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "tests" / "fixtures" / "images" / "chelsea.jpg"
INNOCENT_MAX = 10_000  # innocent requests at most, however long the flood


def memory(pid: int, key: str) -> float:
    """MiB of a /proc/PID/status line (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {key} in /proc/{pid}/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "paligemma2-tiny"))
    p.add_argument("--source", default=str(ROOT), help="checkout whose server runs")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--side", type=int, default=7000, help="width and height of each PNG")
    p.add_argument("--server-args", default="", help="extra options for the server, one string")
    args = p.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (args.side, args.side), (120, 30, 200)).save(buffer, "PNG", compress_level=9)
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with served(args.model, "--log-level", "warning", *args.server_args.split(), source=args.source) as (url, server):
        body = json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": image_url}}] * 4, {"type": "text", "text": "caption en"}]}]})
        small = json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
                SMALL.read_bytes()).decode()}}, {"type": "text", "text": "caption en"}]}]})
        alone = sorted(post(url, small)[1] for _ in range(5))[2]  # the median of five (the first warms up)
        before, codes, waits, statuses = memory(server.pid, "VmRSS"), [], [], set()

        def client():
            codes.append(post(url, body)[0])

        tic = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and len(waits) < INNOCENT_MAX:
            status, seconds = post(url, small)
            waits.append(seconds)
            statuses.add(status)
        for t in threads:
            t.join()
        print(f"{args.clients} clients x 4 PNGs of {args.side}x{args.side} ({len(buffer.getvalue()) // 1024} KB "
              f"each): {time.perf_counter() - tic:.0f} s, statuses {sorted(set(codes))}; server RSS before "
              f"{before:.0f} MiB, peak {memory(server.pid, 'VmHWM'):.0f} MiB, after "
              f"{memory(server.pid, 'VmRSS'):.0f} MiB")
        print(f"an innocent one-image request ({SMALL.name}): {alone:.2f} s alone; during the flood, {len(waits)} "
              f"of them one after another, statuses {sorted(statuses)}, worst {max(waits):.2f} s, median "
              f"{statistics.median(waits):.2f} s")


def post(url: str, body: str) -> tuple:
    """(status, seconds) of one chat completion."""
    request = urllib.request.Request(url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    tic = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=900) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - tic


if __name__ == "__main__":
    main()
