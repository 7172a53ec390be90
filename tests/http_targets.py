"""Fetch targets on 127.0.0.1 (a small HTTP server in a thread) for the tests of the fetch policy (test_fetch) and of
the server under hostile clients (test_hostile_server). Every loop is bounded, and each target records what it
was asked for and what it sent before the client went away, so the tests observe what the client did (stopped
reading, never connected) instead of timing it."""

import io
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

CAT = Path(__file__).parent / "fixtures" / "images" / "chelsea.jpg"
DRIP_BYTES = 60  # a byte every 0.25 s: 15 s in all, far beyond the deadlines of the tests
ENDLESS_CHUNKS = 20_000  # 64 KiB each: 1.3 GB at most, far beyond the caps of the tests


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


class Targets(BaseHTTPRequestHandler):
    """/to/<url>: a redirect there; /loop: a redirect to itself; /missing: 404; /image.png, /cat.jpg, /hello:
    their bytes; /drip: a byte every 0.25 s; /endless: 64 KiB chunks until the client stops reading."""

    # Paths asked for; path -> bytes (or chunks) written before the client went away. Both are replaced for each
    # test (fresh_targets); a request still being served writes to the record of the test that made it.
    hits, sent = [], {}

    def do_GET(self):
        hits, sent = Targets.hits, Targets.sent
        hits.append(self.path)
        if self.path.startswith("/to/") or self.path == "/loop":
            self.send_response(302 if self.path.startswith("/to/") else 301)
            self.send_header("Location", self.path[len("/to/"):] if self.path.startswith("/to/") else "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.end_headers()
        sent[self.path] = 0
        try:
            if self.path == "/image.png":
                self.wfile.write(png())
            elif self.path == "/cat.jpg":
                self.wfile.write(CAT.read_bytes())
            elif self.path == "/hello":
                self.wfile.write(b"hello")
            elif self.path == "/drip":
                for _ in range(DRIP_BYTES):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    sent[self.path] += 1
                    threading.Event().wait(0.25)
            elif self.path == "/endless":
                for _ in range(ENDLESS_CHUNKS):
                    self.wfile.write(b"\xff" * 65536)
                    sent[self.path] += 1
        except OSError:  # the client stopped reading
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def fresh_targets():
    """What the targets were asked and sent, recorded from each test's start: imported by the test modules that
    use the targets, so no test reads another's requests (the server itself may serve a whole module)."""
    Targets.hits, Targets.sent = [], {}


@contextmanager
def serve():
    """The targets' base URL, http://127.0.0.1:PORT, while the block runs."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Targets)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
