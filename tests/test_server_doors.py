"""The server's doors under crowds and hostile bodies: an image waiting for the decoding budget holds no thread, and
turns go by weight and by age, so a small request is not queued behind a flood of large ones and no large one is
starved (server/decoding.py); a body's JSON is counted before it is built, so its memory follows its size (body.py);
whatever the server sends is valid JSON; a port in use is one error line. Every loop is bounded, and what is checked
is behaviour (the order of turns, counts, answers, memory from /proc), never a time."""

import asyncio
import base64
import io
import json
import random
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from PIL import Image

from mlx_paligemma import limits
from mlx_paligemma.errors import InputError
from mlx_paligemma.server import body, decoding
from test_server import IMAGES, MODEL, Server, call, check_error, data_url, image_part, wait_for

JSON_HEADERS = {"Content-Type": "application/json"}
TEXT = {"type": "text", "text": "caption en"}
LINUX = Path("/proc/self/status").exists()


def good(**kw) -> dict:
    return {"max_tokens": 6, "messages": [{"role": "user", "content": [
        image_part(data_url(IMAGES / "chelsea.jpg")), TEXT]}], **kw}


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def strict(text):
    """JSON as RFC 8259 has it: NaN and Infinity are no numbers."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def raw_post(url: str, data: bytes, timeout: float = 120):
    """(status, the body's bytes)."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=data, headers=JSON_HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def peak_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM:")) / 1024


# -- Turns for the decoding budget (in this process, on an event loop) ------------------------------------------------

@pytest.fixture
def budget(monkeypatch):
    """A fresh budget of 100 bytes."""
    monkeypatch.setattr(limits, "LIMITS", replace(limits.LIMITS, decode_budget_bytes=100))
    monkeypatch.setattr(decoding, "DECODING", decoding._Budget())
    return decoding.DECODING


async def settle():
    """Let every task that can run, run (a few rounds of the loop: a release, then the turns it grants)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_turns_go_to_the_lightest_and_the_oldest_and_light_ones_pass_within_room(budget):
    """Budget 100. One image holds it all; two heavy ones (90) and four light ones (4) wait, the light ones come
    later. Turns alternate: the oldest, then the lightest. A heavy one whose turn it is but which does not fit yet is
    passed by light ones only while they leave it room (10 bytes: 100 less its 90), so it starts as soon as the heavy
    one before it ends, however many light ones keep coming."""
    order, done, tasks = [], {}, []

    async def image(name, cost, since):
        done[name] = asyncio.Event()
        async with budget.hold(cost, name, since):
            order.append(name)
            await done[name].wait()

    async def main():
        snapshots = []

        async def then(action, name, *args):
            if action == "come":
                tasks.append(asyncio.create_task(image(name, *args)))
            else:
                done[name].set()
            await settle()
            snapshots.append(list(order))

        await then("come", "H", 100, 0)
        for name, cost, since in [("B1", 90, 1), ("B2", 90, 2), ("S1", 4, 10), ("S2", 4, 11), ("S3", 4, 12),
                                  ("S4", 4, 13)]:
            await then("come", name, cost, since)
        await then("end", "H")
        await then("end", "S1")
        await then("end", "S2")
        await then("come", "S5", 4, 14)
        await then("end", "S3")
        await then("end", "B1")
        for name in ["S4", "S5", "B2"]:
            done[name].set()
        await asyncio.gather(*tasks)
        return snapshots

    snapshots = asyncio.run(main())
    assert snapshots[6] == ["H"]  # all wait
    assert snapshots[7] == ["H", "B1", "S1", "S2"]  # the oldest, the lightest; B2's turn: S2 passes it (room 10)
    assert snapshots[8][4:] == ["S3"]  # S1 ended: S3 passes too (room 6 left)
    assert snapshots[9][5:] == ["S4"]  # S2 ended: S4 takes its room
    assert snapshots[10] == snapshots[9]  # S5 comes: 2 bytes of room left for B2, S5 waits
    assert snapshots[11][6:] == ["S5"]  # S3 ended: its room is S5's
    assert snapshots[12][7:] == ["B2"]  # B1 ended: B2 starts at once, beside the light ones decoding
    assert budget.used == 0 and budget.waiting == [] and budget.passing == []


def test_a_cancelled_wait_leaves_the_line_and_gives_back_its_turn(budget):
    async def main():
        holder = budget.hold(100, "H", 0)
        await holder.__aenter__()
        waiting = [asyncio.create_task(budget.hold(60, f"W{i}", i).__aenter__()) for i in range(2)]
        await settle()
        waiting[0].cancel()  # while it waits
        await settle()
        assert len(budget.waiting) == 1 and budget.used == 100
        await holder.__aexit__(None, None, None)  # W1's turn comes...
        waiting[1].cancel()  # ... and it is cancelled before it runs again: what it was granted is given back
        await settle()
        assert all(t.cancelled() for t in waiting)
        return budget.used, len(budget.waiting)

    assert asyncio.run(main()) == (0, 0)


def test_images_waiting_for_the_budget_hold_no_thread(monkeypatch):
    """100 images for a budget that takes one at a time, the first one's decoding held up: 99 wait, more than the
    threads there are, and they hold none of them; every one is decoded once it is let go."""
    data = png(100)
    cost = 100 * 100 * 8
    monkeypatch.setattr(limits, "LIMITS", replace(limits.LIMITS, decode_budget_bytes=cost))
    monkeypatch.setattr(decoding, "DECODING", decoding._Budget())
    go, inner = threading.Event(), decoding._loaded

    def held_up(image):
        go.wait(120)
        return inner(image)

    monkeypatch.setattr(decoding, "_loaded", held_up)

    async def main():
        threads = anyio.to_thread.current_default_thread_limiter()
        tasks = [asyncio.create_task(decoding.decode_image(data, "x", 10**9, 224)) for _ in range(100)]
        for _ in range(6000):  # until all wait (each was opened in a thread first); bounded
            if len(decoding.DECODING.waiting) == 99:
                break
            await asyncio.sleep(0.01)
        waiting, busy = len(decoding.DECODING.waiting), threads.borrowed_tokens
        other = await anyio.to_thread.run_sync(lambda: "a thread was free")
        go.set()
        results = await asyncio.gather(*tasks)
        return waiting, busy, threads.total_tokens, other, results

    waiting, busy, total, other, results = asyncio.run(main())
    assert waiting == 99 > total and busy == 1  # the one decoding
    assert other == "a thread was free"
    assert [size for _, size in results] == [(100, 100)] * 100 and decoding.DECODING.used == 0


# -- The JSON of a body, in and out (in this process) ---------------------------------------------------------------

def test_values_and_depth_are_counted_before_the_parse():
    at_limit = b"[" + b",".join([b"0"] * limits.MAX_JSON_VALUES) + b"]"  # the list and its items but one
    assert len(body.loads(at_limit)) == limits.MAX_JSON_VALUES
    with pytest.raises(InputError, match=f"more than {limits.MAX_JSON_VALUES} JSON values"):
        body.loads(b"[" + b",".join([b"{}"] * limits.MAX_JSON_VALUES) + b"]")
    deep = limits.MAX_JSON_DEPTH
    assert body.loads(b"[" * deep + b"]" * deep) is not None
    with pytest.raises(InputError, match="nested too deeply"):
        body.loads(b"[" * (deep + 1) + b"]" * (deep + 1))
    # Brackets, commas and escaped quotes inside strings are no structure.
    text = '"' + '[{,\\"\\\\' * 100_000 + '"'
    assert body.loads(("[" + text + "," + text + "]").encode()) == [json.loads(text)] * 2
    # A string never closed: the parse names it.
    with pytest.raises(InputError, match="not valid JSON: Unterminated string"):
        body.loads(b'{"a": "' + b"[," * 100_000)


@pytest.mark.parametrize("text, words", [
    (b'{"temperature": NaN}', "NaN is not a JSON number"),
    (b'{"temperature": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"temperature": 1e400}', "the number 1e400 is out of range"),
    (b'{"a": "\xff"}', "not valid JSON"),
    (b'{"a": 1,}', "not valid JSON"),
])
def test_what_is_not_json_is_refused(text, words):
    with pytest.raises(InputError, match=words):
        body.loads(text)


def test_what_is_sent_is_valid_json():
    content = {"logprob": float("-inf"), "score": float("nan"), "top": [1.5, float("inf"), {"x": [float("nan")]}],
               "text": "\ud800 caf\u00e9"}
    text = body.dumps(content)
    assert text.isascii()
    assert strict(text) == {"logprob": None, "score": None, "top": [1.5, None, {"x": [None]}], "text": content["text"]}


# -- The server --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    s = Server(MODEL, "--max-tokens-limit", "64")
    s.answer = call(s.url + "/v1/chat/completions", good(), JSON_HEADERS)[1]["choices"][0]["message"]["content"]
    yield s
    s.stop()


def test_what_the_server_sends_has_no_nan_or_infinity(server):
    """A constraint leaves one token possible at each step: the other top_logprobs alternatives are -inf, sent as
    null, in the whole answer and in the streamed one."""
    pytest.importorskip("llguidance")
    ask = good(max_tokens=4, logprobs=True, top_logprobs=5, choices=["cat"])
    status, sent = raw_post(server.url, json.dumps(ask).encode())
    assert status == 200, sent
    entries = strict(sent)["choices"][0]["logprobs"]["content"]
    assert any(t["logprob"] is None for e in entries for t in e["top_logprobs"])
    status, sent = raw_post(server.url, json.dumps({**ask, "stream": True}).encode())
    events = [line[len(b"data: "):] for line in sent.splitlines() if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]"
    tops = [t["logprob"] for e in events[:-1] for c in strict(e)["choices"]
            for entry in (c["logprobs"] or {}).get("content", []) for t in entry["top_logprobs"]]
    assert None in tops


def mutated(r: random.Random, data: bytes) -> bytes:
    """A good body broken in one of the ways a hostile or careless client breaks one."""
    i = r.randrange(len(data))
    kind = r.randrange(8)
    if kind == 0:
        return data[:i]
    if kind == 1:
        return data[:i] + bytes([r.randrange(256)]) + data[i + 1:]
    if kind == 2:
        return data[:i] + r.choice([b"[", b"{", b'"', b"\\", b",", b":", b"]", b"}", b"NaN", b"1e400", b"\xff"]) + \
            data[i:]
    if kind == 3:
        return data[:i] + b"[" * r.choice([99, 101, 5000]) + data[i:]
    if kind == 4:
        return data.replace(b'"max_tokens": 6', b'"max_tokens": ' + r.choice([b"NaN", b"-Infinity", b"1e400", b"-0",
                                                                             b"6.5", b"1" * 5000, b"[]", b"{}"]))
    if kind == 5:
        return data[:-1] + b', "ignored": [' + b"{}," * r.choice([10, 60_000]) + b"{}]}"
    if kind == 6:
        return data.replace(b"caption en", r.choice(["caption \ud800", "\u0000", "caption\\", "\\u0000"]).encode(
            "utf-8", "surrogatepass"))
    return bytes(b ^ 0x20 if r.random() < 0.01 else b for b in data)


def test_no_body_gets_a_500(server):
    """A few hundred bodies broken at random (seeded): each is answered with an OpenAI error or an answer, never a
    500, and the server goes on."""
    r = random.Random(7)
    data = json.dumps(good()).encode()
    bodies = [mutated(r, data) for _ in range(300)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: raw_post(server.url, b), bodies))
    for (status, sent), sent_body in zip(results, bodies):
        reply = strict(sent)
        assert status < 500, (sent_body[:200], reply)
        assert status == 200 or "\n" not in reply["error"]["message"]
    assert raw_post(server.url, data)[0] == 200
    assert server.health()["active"] == 0


@pytest.mark.skipif(not LINUX, reason="reads the server's memory in /proc")
def test_bodies_of_millions_of_values_are_refused_before_they_are_built():
    """Eight bodies at once, each 32 MiB whose ignored field holds ~11 million `{}` (0.8 GB each once parsed): each
    is a 400 naming the limit, and the server's peak memory grows by less than the bodies' own size twice over."""
    s = Server(MODEL)
    try:
        hostile = json.dumps(good())[:-1].encode() + b', "ignored": [' + b"{}," * 11_000_000 + b"{}]}"
        assert len(hostile) <= 32 * 2**20
        assert raw_post(s.url, json.dumps(good()).encode())[0] == 200  # warm: the first answer's memory is counted
        before = peak_mib(s.process.pid)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: raw_post(s.url, hostile), range(8)))
        for status, sent in results:
            check_error(status, strict(sent), 400, f"more than {limits.MAX_JSON_VALUES} JSON values")
        grown = peak_mib(s.process.pid) - before
        assert grown < 2 * 8 * len(hostile) / 2**20, f"peak grew by {grown:.0f} MiB"
        assert raw_post(s.url, json.dumps(good()).encode())[0] == 200
    finally:
        s.stop()


def test_a_small_request_is_not_queued_behind_an_image_flood():
    """48 clients each send two 3000x3000 PNGs (72 MB each to decode) to a budget that decodes one at a time: more
    images wait than there are threads, and meanwhile a one-picture request is answered, as it is alone, while the
    flood still waits. (Before, each waiting request held a thread, and a small one queued behind them all.)"""
    s = Server(MODEL, "--decode-budget-bytes", str(80 * 10**6))
    try:
        answer = call(s.url + "/v1/chat/completions", good(), JSON_HEADERS)[1]["choices"][0]["message"]["content"]
        big = image_part("data:image/png;base64," + base64.b64encode(png(3000)).decode())
        flood = json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": [big, big, TEXT]}]}).encode()
        with ThreadPoolExecutor(48) as pool:
            floods = [pool.submit(raw_post, s.url, flood, 600) for _ in range(48)]
            wait_for(s, lambda h: h["images_waiting"] > 40, timeout=300)
            status, reply = call(s.url + "/v1/chat/completions", good(), JSON_HEADERS, timeout=300)
            still_waiting = s.health()["images_waiting"]
            statuses = [f.result()[0] for f in floods]
        assert status == 200 and reply["choices"][0]["message"]["content"] == answer
        assert still_waiting > 0
        assert statuses == [200] * 48 and s.health()["images_waiting"] == 0
    finally:
        s.stop()


def test_a_port_in_use_is_one_error_line():
    """Five times (it aborted in most tries): exit 1, one `error:` line naming the port, before the model loads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(5):
            r = subprocess.run([sys.executable, "-m", "mlx_paligemma.server", "--model", str(MODEL), "--port",
                                str(port)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 1, r.stderr
            assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert f"port {port}" in r.stderr and "in use" in r.stderr
