"""The server as users run it (`python -m mlx_paligemma.server`, a process of its own on 127.0.0.1), through the
official openai client: answers equal generate's, concurrent requests equal one-at-a-time ones, every bad request
gets a 4xx naming its problem and the server goes on, full queues answer 503, clients that leave free their row."""

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai  # the test extra installs it (and the server extra starlette and uvicorn)
import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES, hand_objects

MODEL = FIXTURES / "paligemma2-tiny"
IMAGES = FIXTURES / "images"
KEY = "test-key"
EOS = 1  # the tiny checkpoints' <eos>: a logit bias of -100 on it makes an answer run to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, headers=None, method=None, timeout=30):
    """(status, parsed JSON) of one request, error statuses included."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server:
    """`python -m mlx_paligemma.server` in a subprocess on a free port, ready when /health answers."""

    def __init__(self, model, *options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_paligemma.server", "--model", str(model), "--port", str(self.port),
             "--log-level", "warning", *options], stdout=self.log, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if call(self.url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("the server did not answer /health within 120 s")
            time.sleep(0.2)

    def health(self) -> dict:
        return call(self.url + "/health")[1]

    def wait_idle(self, timeout=120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h["active"] == 0 and h["waiting"] == 0:
                return h
            time.sleep(0.05)
        pytest.fail(f"rows still busy after {timeout} s: {self.health()}")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def data_url(path) -> str:
    kind = "png" if str(path).endswith(".png") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def message(prompt, *images):
    parts = [{"type": "image_url", "image_url": {"url": i if i.startswith(("data:", "http")) else data_url(i)}}
             for i in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def server():
    s = Server(MODEL, "--api-key", KEY, "--batch-size", "8", "--queue-size", "8", "--max-tokens-limit", "4000",
               "--max-images", "2", "--max-image-pixels", "1000000", "--max-image-bytes", "200000",
               "--max-body-bytes", "2000000", "--fetch-timeout", "1", "--allow-private-urls")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded():
    return mp.load(str(MODEL))


def expected(loaded, prompt, images, max_tokens, **settings):
    model, processor = loaded
    return mp.generate(model, processor, [str(i) for i in images], prompt, max_tokens=max_tokens, **settings).text


# Prompts for the tiny model: mixed lengths (so rows leave at different steps), two images, an <image> marker.
CASES = [
    ("caption en", ["chelsea.jpg"]),
    ("detect cat", ["chelsea.jpg"]),
    ("answer en what is on the table?", ["coffee.jpg"]),
    ("ocr", ["gray.png"]),
    ("answer en which one shows a cat, first or second?", ["chelsea.jpg", "coffee.jpg"]),
    ("<image> caption en", ["rgba.png"]),
    ("segment cat", ["odd.png"]),
    ("describe en", ["coffee.jpg"]),
]


def ask(client, prompt, images, stream=False, **kw):
    """The answer's text, finish reason, usage and objects, streamed or not."""
    messages = message(prompt, *[str(IMAGES / i) for i in images])
    if not stream:
        r = client.chat.completions.create(model=str(MODEL), messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage, getattr(r, "objects", None)
    text, finish, usage, objects = "", None, None, None
    chunks = client.chat.completions.create(model=str(MODEL), messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **kw)
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            objects = getattr(chunk, "objects", None) or objects
    return text, finish, usage, objects


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answers_equal_generate(server, client, loaded, stream):
    for prompt, images in CASES:
        want = expected(loaded, prompt, [IMAGES / i for i in images], 24)
        text, finish, usage, _ = ask(client, prompt, images, stream, max_tokens=24)
        assert text == want, prompt
        assert finish in ("stop", "length")
        assert usage.completion_tokens <= 24 and usage.prompt_tokens > 16 * len(images)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # max_completion_tokens is the newer name of max_tokens.
    text, finish, usage, _ = ask(client, "caption en", ["chelsea.jpg"], stream, max_completion_tokens=5)
    assert (text, finish, usage.completion_tokens) == (expected(loaded, "caption en", [IMAGES / "chelsea.jpg"], 5),
                                                        "length", 5)


def test_stop_seed_temperature_and_top_p(server, client, loaded):
    full = expected(loaded, "caption en", [IMAGES / "coffee.jpg"], 30)
    stop = full[10:14]
    text, finish, _, _ = ask(client, "caption en", ["coffee.jpg"], max_tokens=30, stop=[stop])
    assert text == expected(loaded, "caption en", [IMAGES / "coffee.jpg"], 30, stop=[stop]) == full[:full.index(stop)]
    assert finish == "stop"
    sampled = dict(max_tokens=20, temperature=0.9, top_p=0.8, seed=7)
    want = expected(loaded, "caption en", [IMAGES / "chelsea.jpg"], **sampled)
    assert ask(client, "caption en", ["chelsea.jpg"], **sampled)[0] == want
    assert ask(client, "caption en", ["chelsea.jpg"], True, **sampled)[0] == want
    assert want != expected(loaded, "caption en", [IMAGES / "chelsea.jpg"], 20)


def test_eight_concurrent_requests_equal_one_at_a_time(server, client):
    one_at_a_time = [ask(client, p, i, max_tokens=16 + 3 * n)[0] for n, (p, i) in enumerate(CASES)]
    before = server.health()["finished"]
    with ThreadPoolExecutor(8) as pool:  # half streamed, half not, all at once
        futures = [pool.submit(ask, client, p, i, n % 2 == 1, max_tokens=16 + 3 * n) for n, (p, i) in enumerate(CASES)]
        together = [f.result()[0] for f in futures]
    assert together == one_at_a_time
    assert server.health()["finished"] == before + 8


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [str(MODEL)]
    health = server.health()
    assert health["status"] == "ok" and health["model"] == str(MODEL)


def test_detect_answers_come_with_their_objects(server, client, loaded):
    size = Image.open(IMAGES / "chelsea.jpg").size
    text, _, _, objects = ask(client, "detect cat", ["chelsea.jpg"], max_tokens=12)
    alone = mp.generate(*loaded, [str(IMAGES / "chelsea.jpg")], "detect cat", max_tokens=12, logprobs=0)
    assert text == alone.text
    want = hand_objects(loaded[1], alone, size)
    assert want, "the tiny model's answer to this prompt has a box: the test needs one"
    assert objects == want
    assert ask(client, "detect cat", ["chelsea.jpg"], True, max_tokens=12)[3] == want
    # Asked for on any prompt, refused on a detect prompt.
    assert ask(client, "caption en", ["chelsea.jpg"], max_tokens=12, extra_body={"objects": True})[3] is not None
    assert ask(client, "detect cat", ["chelsea.jpg"], max_tokens=12, extra_body={"objects": False})[3] is None
    assert ask(client, "caption en", ["chelsea.jpg"], max_tokens=12)[3] is None


class Images(BaseHTTPRequestHandler):
    """Image URLs for the server to fetch: an image, one too big, one too slow, a missing one."""

    def do_GET(self):
        if self.path == "/slow.jpg":
            time.sleep(3)
        body = {"/chelsea.jpg": (IMAGES / "chelsea.jpg").read_bytes(), "/big.jpg": b"\xff" * 300_000,
                "/slow.jpg": (IMAGES / "chelsea.jpg").read_bytes()}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the server gave up on a slow image
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_urls_are_fetched_within_limits(server, client, loaded, image_host):
    want = expected(loaded, "caption en", [IMAGES / "chelsea.jpg"], 10)
    r = client.chat.completions.create(model=str(MODEL), max_tokens=10,
                                       messages=message("caption en", image_host + "/chelsea.jpg"))
    assert r.choices[0].message.content == want


def png(width, height) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def good():
    return {"model": str(MODEL), "max_tokens": 4, "messages": message("caption en", str(IMAGES / "chelsea.jpg"))}


def with_(**changes):
    return {**good(), **changes}


def only(*parts):
    return with_(messages=[{"role": "user", "content": list(parts)}])


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "caption en"}
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

# (name, body, status, words the error message must hold)
ERRORS = [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", [1, 2], 400, "JSON object"),
    ("no messages", with_(messages=[]), 400, "messages must be a non-empty list"),
    ("assistant last", with_(messages=good()["messages"] + [{"role": "assistant", "content": "hi"}]), 400,
     "not a chat model"),
    ("no image", with_(messages=[{"role": "user", "content": "caption en"}]), 400, "needs an image"),
    ("no image in any message", with_(messages=[{"role": "user", "content": "caption en"}, {"role": "assistant",
                                                 "content": "a cat"}, {"role": "user", "content": "caption en"}]), 400,
     "needs an image"),
    ("broken base64", only(image_part("data:image/png;base64,iVBOR%%%%"), TEXT), 400, "base64"),
    ("not an image", only(image_part("data:image/png;base64," + base64.b64encode(b"hello").decode()), TEXT), 400,
     "does not decode"),
    ("truncated image", only(image_part("data:image/jpeg;base64," + base64.b64encode(
        (IMAGES / "chelsea.jpg").read_bytes()[:5000]).decode()), TEXT), 400, "does not decode"),
    ("too many pixels", only(image_part(png(1200, 1000)), TEXT), 400, "more than this server's limit of 1000000"),
    ("too many images", only(*[image_part(png(8, 8))] * 3, TEXT), 400, "at most 2"),
    ("images beyond the markers", only(image_part(png(8, 8)), image_part(png(8, 8)),
                                        {"type": "text", "text": "<image> caption en"}), 400, "<image> markers"),
    ("local file", only(image_part(str(IMAGES / "chelsea.jpg")), TEXT), 400, "--allow-local-files"),
    ("unknown part", only({"type": "audio", "audio": "x"}, TEXT), 400, "unsupported content part"),
    ("negative temperature", with_(temperature=-1), 400, "temperature must be"),
    ("temperature above 2", with_(temperature=3), 400, "temperature must be in [0, 2]"),
    ("top_p 0", with_(top_p=0), 400, "top_p must be in (0, 1]"),
    ("max_tokens 0", with_(max_tokens=0), 400, "max_tokens must be an integer >= 1"),
    ("max_tokens a string", with_(max_tokens="10"), 400, "max_tokens must be an integer"),
    ("max_tokens above the limit", with_(max_tokens=5000), 400, "limit of 4000"),
    ("negative seed", with_(seed=-1), 400, "seed must be an integer >= 0"),
    ("n 9", with_(n=9), 400, "n must be an integer in [1, 8]"),
    ("five stops", with_(stop=["a", "b", "c", "d", "e"]), 400, "stop must be"),
    ("a stop of 1 MB", with_(stop=["x" * 1_000_000]), 400, "more than this server's limit of 256"),
    ("a stop not a string", with_(stop=[5]), 400, "stop must be"),
    ("stream_options 5", with_(stream=True, stream_options=5), 400, "stream_options must be an object"),
    ("include_usage 5", with_(stream=True, stream_options={"include_usage": 5}), 400, "include_usage must be"),
    ("stream a string", with_(stream="yes"), 400, "stream must be true or false"),
    ("model a number", with_(model=5), 400, "model must be a string"),
    ("n true", with_(n=True), 400, "n must be an integer in [1, 8]"),
    ("frequency_penalty a string", with_(frequency_penalty="x"), 400, "frequency_penalty is not supported"),
    ("logit_bias of 2000 tokens", with_(logit_bias={str(i): 1 for i in range(2000)}), 400, "at most 1024"),
    ("JSON 5000 deep", b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    ("lone surrogate", only(image_part(png(8, 8)), {"type": "text", "text": "caption \ud800"}), 400,
     "not valid text"),
    ("text part not a string", only(image_part(png(8, 8)), {"type": "text", "text": 5}), 400,
     "unsupported content part"),
    ("100 content parts", only(image_part(png(8, 8)), *[TEXT] * 99), 400, "at most 64"),
    ("ftp URL", only(image_part("ftp://127.0.0.1/x.jpg"), TEXT), 400, "only data:, http and https"),
    ("logit_bias key", with_(logit_bias={"x": 1}), 400, "logit_bias keys must be token ids"),
    ("logit_bias id", with_(logit_bias={"99999": 1}), 400, "token ids in [0, 1600)"),
    ("logit_bias value", with_(logit_bias={"5": 300}), 400, "[-100, 100]"),
    ("objects not a boolean", with_(objects="yes"), 400, "objects must be true or false"),
    ("prompt over the byte limit", only(image_part(png(8, 8)), {"type": "text", "text": "cat " * 9000}), 400,
     "more than this server's limit of 32768 bytes"),
    ("prompt over the context", only(image_part(png(8, 8)), {"type": "text", "text": "a " * 8300}), 400,
     "more than the model's 8192"),
]


def test_a_request_naming_another_model_is_answered_by_the_one_served(server):
    status, body = call(server.url + "/v1/chat/completions", with_(model="mlx-community/paligemma2-3b-mix-224-bf16"),
                        AUTH)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == call(server.url + "/v1/chat/completions", good(), AUTH)[1][
        "choices"][0]["message"]["content"]


def check_error(status, body, want_status, words):
    assert status == want_status, body
    error = body["error"]
    assert words in error["message"]
    assert "\n" not in error["message"] and error["type"]


@pytest.mark.parametrize("name, body, status, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_a_4xx_naming_the_problem(server, name, body, status, words):
    check_error(*call(server.url + "/v1/chat/completions", body, AUTH), status, words)
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200  # and the server goes on


# Too large, too slow, missing: one message, so that a client cannot tell what is behind an address.
@pytest.mark.parametrize("path, status, words", [("/big.jpg", 400, "could not fetch"),
                                                 ("/slow.jpg", 400, "could not fetch"),
                                                 ("/missing.jpg", 400, "could not fetch")])
def test_bad_image_urls(server, image_host, path, status, words):
    check_error(*call(server.url + "/v1/chat/completions", only(image_part(image_host + path), TEXT), AUTH),
                status, words)
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    # Sent as a header alone: the 413 comes before the body, as a client sending one would see it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 2000001\r\n\r\n".encode())
        response = s.makefile("rb").read().decode()
    assert response.startswith("HTTP/1.1 413")
    check_error(413, json.loads(response.split("\r\n\r\n", 1)[1]), 413, "limit of 2000000")
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def test_api_key_and_routes(server):
    url = server.url + "/v1/chat/completions"
    check_error(*call(url, good(), {"Content-Type": "application/json"}), 401, "API key")
    check_error(*call(url, good(), {"Authorization": "Bearer wrong"}), 401, "API key")
    check_error(*call(server.url + "/v1/models"), 401, "API key")
    check_error(*call(url, headers=AUTH), 405, "Method Not Allowed")
    check_error(*call(server.url + "/v1/nothing", headers=AUTH), 404, "Not Found")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def endless(client, **kw):
    """A streamed request that would run to its max_tokens (eos banned), opened: the server has accepted it."""
    return client.chat.completions.create(model=str(MODEL), messages=message("caption en", str(IMAGES / "chelsea.jpg")),
                                          stream=True, max_tokens=4000, logit_bias={str(EOS): -100}, **kw)


def test_a_full_queue_answers_503_and_frees_up(server, client):
    streams = [endless(client) for _ in range(16)]  # 8 rows running, 8 waiting: the server's capacity
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            endless(client)
        assert refused.value.status_code == 503 and "busy" in refused.value.message
    finally:
        for s in streams:
            s.close()
    server.wait_idle()
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def test_a_client_that_leaves_frees_its_row(server, client):
    before, finished = server.health()["cancelled"], server.health()["finished"]
    stream = endless(client)
    pieces = [next(iter(stream)) for _ in range(3)]
    assert pieces[1].choices[0].delta.content
    assert server.health()["active"] == 1
    stream.close()
    # Observed, not timed: the row is cancelled (not finished) and the server goes idle, within a generous deadline.
    health = server.wait_idle(timeout=120)
    assert health["cancelled"] == before + 1 and health["finished"] == finished
    # A non-streamed request whose client leaves (closes its connection) is cancelled too. It waits behind a full
    # batch, seen in /health, so it cannot have finished before the client leaves, however fast the machine.
    streams = [endless(client) for _ in range(8)]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", headers=AUTH, body=json.dumps(
            {**good(), "max_tokens": 4000, "logit_bias": {str(EOS): -100}}))
        wait_for(server, lambda h: h["active"] == 8 and h["waiting"] == 1)
    finally:
        connection.close()
    wait_for(server, lambda h: h["cancelled"] == before + 2)
    for s in streams:
        s.close()
    assert server.wait_idle(timeout=120)["cancelled"] == before + 10
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def wait_for(server, condition, timeout=120.0) -> dict:
    """/health once the condition holds; the deadline is only there so that a broken server fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = server.health()
        if condition(health):
            return health
        time.sleep(0.02)
    pytest.fail(f"not reached within {timeout} s: {server.health()}")


def test_bad_options_end_with_one_line(tmp_path):
    missing = tmp_path / "nothing"
    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.server", "--model", str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
