"""A long prefill does not hold the server: SIGINT/SIGTERM during it keep their grace (the client gets a JSON 503,
the log no traceback), and a client that leaves during it frees the model within a piece of it. A real server
process on 127.0.0.1; the prompt (~7,200 tokens, within the tiny model's 8,192 positions and the default prompt
limit) takes ~15 s to prefill on a CPU, a piece of it (1,024 queries of one layer) about a second."""

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_server import IMAGES, MODEL, Server, data_url, wait_for

GRACE_S = 1.0
# The bound on what follows a signal or a departure: the grace, the piece under way, the app's look for departed
# clients (KEEPALIVE_S, 1 s) and the process's own exit. The prefill alone takes much longer, and uvicorn would cut
# the connections itself (a plain-text 500, a traceback) at the grace + 3 s.
BOUND_S = 6.0
LONG = {"max_tokens": 1, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url(IMAGES / "chelsea.jpg")}},
    {"type": "text", "text": "cat " * 7200}]}]}


def send(url, body):
    """(status, content type, body) of one request, error statuses included."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_long_prefill_keeps_its_grace(sig, code):
    s = Server(MODEL, "--shutdown-grace", str(GRACE_S))
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(send, s.url, LONG)
            wait_for(s, lambda h: h["prefilling"] == 1)
            signalled = time.monotonic()
            s.process.send_signal(sig)
            returncode = s.process.wait(timeout=120)
            took = time.monotonic() - signalled
            status, kind, body = answer.result()
        stderr = s.process.stderr.read()
    finally:
        s.stop()  # a no-op wait when the signal has ended it
    assert returncode == code, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    assert (status, kind) == (503, "application/json"), body
    assert json.loads(body)["error"]["message"] == "the server is shutting down"
    assert took < GRACE_S + BOUND_S


def test_a_client_leaving_during_a_long_prefill_frees_the_model():
    s = Server(MODEL)
    try:
        body = json.dumps(LONG).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(s, lambda h: h["prefilling"] == 1)
        left = time.monotonic()
        health = wait_for(s, lambda h: h["cancelled"] == 1 and h["prefilling"] == 0, timeout=60)
        assert time.monotonic() - left < BOUND_S
        assert (health["active"], health["waiting"], health["finished"]) == (0, 0, 0)  # never decoded
        short = {**LONG, "messages": [{"role": "user", "content": [LONG["messages"][0]["content"][0],
                                                                   {"type": "text", "text": "caption en"}]}]}
        status, kind, _ = send(s.url, short)
        assert (status, kind) == (200, "application/json")
    finally:
        s.stop()
