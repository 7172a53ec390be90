"""The server under hostile clients, with real sockets on 127.0.0.1 only: idle and slow connections, requests whose
cost would be unbounded, wrongly typed fields, fetches of local addresses and endless or dripping URLs, files
outside the allowed folder, and SIGINT/SIGTERM with requests running. After each case the invariants: the server
still answers a good request with the same answer, nothing is left running, its memory stays bounded. Every loop
is bounded, and what is checked is observed behaviour (answers, counters, what a target sent), never a time."""

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_paligemma.limits import MAX_JSON_VALUES
# fresh_targets is autouse: imported, it resets what the targets recorded before each test here.
from http_targets import DRIP_BYTES, ENDLESS_CHUNKS, Targets, fresh_targets, serve  # noqa: F401
from test_server import EOS, IMAGES, MODEL, Server, call, check_error, data_url, image_part, png, wait_for

TEXT = {"type": "text", "text": "caption en"}
JSON_HEADERS = {"Content-Type": "application/json"}


def good(**kw) -> dict:
    return {"max_tokens": 6, "messages": [{"role": "user", "content": [
        image_part(data_url(IMAGES / "chelsea.jpg")), TEXT]}], **kw}


def only(*parts, **kw) -> dict:
    return {"max_tokens": 6, "messages": [{"role": "user", "content": list(parts)}], **kw}


def rss_mib(pid: int) -> float:
    """A process's resident memory: /proc on Linux, ps where there is no /proc (macOS: its rss is in KiB too)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True).stdout
    return int(out.strip()) / 1024


@pytest.fixture(scope="module")
def targets():
    with serve() as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "allowed").mkdir()
    (root / "allowed" / "cat.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    (root / "secret.jpg").write_bytes((IMAGES / "chelsea.jpg").read_bytes())
    (root / "allowed" / "link.jpg").symlink_to(root / "secret.jpg")
    return root


@pytest.fixture(scope="module")
def server(files):
    """Trusted-network settings (127.0.0.1 targets must be fetched), a 1 s fetch deadline, the default body limit
    (so a 30 MB prompt reaches the prompt check)."""
    s = Server(MODEL, "--allow-private-urls", "--fetch-timeout", "1", "--max-image-bytes", "200000",
               "--allow-local-files", str(files / "allowed"), "--batch-size", "4", "--queue-size", "4",
               "--max-tokens-limit", "4000")
    s.answer = call(s.url + "/v1/chat/completions", good(), JSON_HEADERS)[1]["choices"][0]["message"]["content"]
    s.rss = rss_mib(s.process.pid)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def default_server():
    s = Server(MODEL)
    yield s
    s.stop()


def still_good(server):
    """The invariants after a case: a good request gets the same answer, nothing left running, memory bounded."""
    status, body = call(server.url + "/v1/chat/completions", good(), JSON_HEADERS)
    assert status == 200 and body["choices"][0]["message"]["content"] == server.answer
    health = server.wait_idle()
    assert health["active"] == 0 and health["waiting"] == 0
    assert rss_mib(server.process.pid) < server.rss + 1024  # MiB


def post(server, body, headers=JSON_HEADERS):
    return call(server.url + "/v1/chat/completions", body, headers, timeout=120)


# Cost bounded before the work: each is refused with a 4xx naming its limit, the worker never sees it.
COSTLY = [
    ("stop 1 MB", good(stop=["x" * 1_000_000]), 400, "limit of 256"),
    ("prompt 30 MB", only(image_part(png(8, 8)), {"type": "text", "text": "cat " * 7_500_000}), 400,
     "limit of 32768 bytes"),
    ("JSON 5000 deep", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    # 32 MiB, its ignored field ~11 million `{}` (0.8 GB once parsed): counted before it is built.
    ("JSON 11 million values", json.dumps(good())[:-1].encode() + b', "x": [' + b"{}," * 11_000_000 + b"{}]}", 400,
     f"more than {MAX_JSON_VALUES} JSON values"),
    ("JSON NaN", json.dumps(good())[:-1].encode() + b', "temperature": NaN}', 400, "NaN is not a JSON number"),
    ("JSON 1e400", json.dumps(good())[:-1].encode() + b', "top_p": 1e400}', 400, "1e400 is out of range"),
    ("5 images", only(*[image_part(png(8, 8))] * 5, TEXT), 400, "at most 4"),
    ("max_tokens 10**30", good(max_tokens=10**30), 400, "limit of 4000"),
    ("image of 60 megapixels", only(image_part(png(10000, 6000)), TEXT), 400, "limit of 50000000"),
]


@pytest.mark.parametrize("name, body, status, words", COSTLY, ids=[c[0] for c in COSTLY])
def test_costly_requests_are_refused_before_the_work(server, name, body, status, words):
    finished = server.health()["finished"]
    check_error(*post(server, body), status, words)
    assert server.health()["finished"] == finished
    still_good(server)


def test_wrongly_typed_fields_leave_no_job_running(server):
    """40 at once of each (`stream_options: 5` was once a 500 with its job still running)."""
    bad = [good(stream=True, stream_options=5), good(stream=True, stream_options={"include_usage": "yes"}),
           good(stream=1), good(temperature="hot"), good(seed=1.5), good(top_k=[1]), good(logit_bias=[1]),
           good(max_tokens=None, max_completion_tokens="9"), good(objects=1), good(n="2")]
    before = server.health()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: post(server, b), bad * 4))
    for status, body in results:
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    after = server.health()
    assert (after["finished"], after["cancelled"], after["active"], after["waiting"]) == (
        before["finished"], before["cancelled"], 0, 0)
    still_good(server)


def test_idle_connections_do_not_lock_others_out(server):
    idle = []
    try:
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=60))
        still_good(server)
        # Half a request head, a byte at a time, on a few more: still answered.
        slow = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(20)]
        idle += slow
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        still_good(server)
        # The server closes a connection that sends no whole request head (its deadline ends it; we only wait).
        idle[0].settimeout(120)
        assert idle[0].recv(1) == b""
        slow[0].settimeout(120)
        assert slow[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
    still_good(server)


@pytest.mark.parametrize("raw, words", [
    (b"GARBAGE\r\n\r\n", "bad HTTP request"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000, "bad HTTP request"),  # a head over 16 KiB
])
def test_bad_http_gets_openai_json(server, raw, words):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(raw)
        response = s.makefile("rb").read().decode()
    assert response.startswith("HTTP/1.1 400")
    check_error(400, json.loads(response.split("\r\n\r\n", 1)[1]), 400, words)
    still_good(server)


def test_dripping_and_endless_urls_end_at_the_deadline_and_the_cap(server, targets):
    with ThreadPoolExecutor(8) as pool:  # several at once: the server's threads are not all taken
        results = list(pool.map(lambda u: post(server, only(image_part(targets + u), TEXT)), ["/drip"] * 6))
        results.append(post(server, only(image_part(targets + "/endless"), TEXT)))
    for status, body in results:
        check_error(status, body, 400, "could not fetch")
    assert Targets.sent["/drip"] < DRIP_BYTES // 2 and Targets.sent["/endless"] < ENDLESS_CHUNKS
    still_good(server)


def test_redirects_and_fetch_failures(server, targets):
    check_error(*post(server, only(image_part(f"{targets}/to/ftp://127.0.0.1/x.jpg"), TEXT)), 400,
                "only http and https")
    status, body = post(server, only(image_part(f"{targets}/to/{targets}/cat.jpg"), TEXT))
    assert status == 200, body
    # A closed port, an open port serving something that is not an image: the same message, the URL aside.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    messages = set()
    for url in [closed, targets + "/hello"]:
        status, body = post(server, only(image_part(url), TEXT))
        assert status == 400
        messages.add(body["error"]["message"].replace(url, "URL"))
    assert len(messages) == 1, messages
    still_good(server)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "2130706433:{port}", "0x7f.1:{port}",
                                  "[::ffff:127.0.0.1]:{port}", "[::1]:{port}", "169.254.169.254", "10.1.2.3"])
def test_local_addresses_are_refused_by_default(default_server, targets, host):
    port = targets.rsplit(":", 1)[1]
    before = len(Targets.hits)
    url = f"http://{host.format(port=port)}/cat.jpg"
    check_error(*post(default_server, only(image_part(url), TEXT)), 400, "--allow-private-urls")
    check_error(*post(default_server, only(image_part(f"{targets}/to/{targets}/cat.jpg"), TEXT)), 400,
                "not a public address")
    assert len(Targets.hits) == before  # the server never connected
    status, _ = post(default_server, good())
    assert status == 200


def test_local_files_stay_inside_the_allowed_folder(server, files):
    status, body = post(server, only(image_part(str(files / "allowed" / "cat.jpg")), TEXT))
    assert status == 200 and body["choices"][0]["message"]["content"] == server.answer
    assert post(server, only(image_part("cat.jpg"), TEXT))[0] == 200  # relative to the folder
    for path in ["../secret.jpg", str(files / "secret.jpg"), "link.jpg", "file:///etc/passwd", "/etc/shadow",
                 "../nothing.jpg"]:
        check_error(*post(server, only(image_part(path), TEXT)), 400, "outside")
    still_good(server)


def test_messages_show_no_object_repr(server):
    status, body = post(server, only(image_part("data:image/png;base64,aGVsbG8="), TEXT))
    assert status == 400 and "0x" not in body["error"]["message"] and "in the data URL" in body["error"]["message"]


def test_served_model_name_and_adapter_path(tmp_path):
    s = Server(MODEL, "--served-model-name", "my-model")
    try:
        assert [m["id"] for m in call(s.url + "/v1/models")[1]["data"]] == ["my-model"]
        assert post(s, good(model="my-model"))[0] == 200
        status, body = post(s, good(model=str(MODEL)))  # another name: answered by the one model served, as itself
        assert status == 200 and body["model"] == "my-model", body
    finally:
        s.stop()
    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.server", "--model", str(MODEL), "--adapter-path",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def stream_events(url, body):
    """Every SSE data line of a streamed request, until the server ends it (or the connection drops)."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=JSON_HEADERS)
    events = []
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
    except OSError as e:
        events.append(f"dropped: {e}".encode())
    return events


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_shutdown_with_requests_running_and_waiting(sig, code):
    s = Server(MODEL, "--batch-size", "2", "--queue-size", "4", "--max-tokens-limit", "8000",
               "--shutdown-grace", "1")
    try:
        assert post(s, good())[0] == 200  # the server has served (SIGINT once aborted after a request)
        endless = {"stream": True, "max_tokens": 8000, "logit_bias": {str(EOS): -100},
                   "messages": good()["messages"]}
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream_events, s.url, endless) for _ in range(4)]
            wait_for(s, lambda h: h["active"] == 2 and h["waiting"] >= 1)
            s.process.send_signal(sig)
            returncode = s.process.wait(timeout=120)
            results = [f.result() for f in streams]
        stderr = s.process.stderr.read()
    finally:
        s.stop()  # a no-op wait when the signal has ended it
    assert returncode == code, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    # Every client got an end: an error event naming the shutdown (a row that finished just before the signal: its
    # [DONE]); the one seen waiting was refused.
    assert all(events and (b"shutting down" in events[-1] or events[-1] == b"[DONE]") for events in results), \
        [events[-1:] for events in results]
    assert sum(b"shutting down" in events[-1] for events in results) >= 1
