"""`python -m mlx_paligemma.server` on 127.0.0.1 for a benchmark: started, waited for (bounded), stopped.

    with served(model, "--batch-size", "8") as (url, server):
        ...  # url is http://127.0.0.1:PORT, server the Popen (its pid for memory or CPU figures)
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model: str, *options: str, source=None, start_seconds: float = 600, quiet: bool = False):
    """The server of `source` (a checkout; default: the one Python imports) with `options`, once /health answers
    (within `start_seconds`: a large model loads slowly; the benchmark exits with one line otherwise)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen([sys.executable, "-m", "mlx_paligemma.server", "--model", str(model), "--port", str(port),
                               *options], cwd=source, env=env, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"the server did not answer /health within {start_seconds:.0f} s")
                time.sleep(0.2)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
