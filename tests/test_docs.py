"""Every ```bash and ```python block of README.md and docs/*.md runs, so a recipe that drifts fails.

Each page runs in its own temporary folder holding a copy of what the docs name (examples/, tests/fixtures/,
convert.py), its blocks in order: a bash block as one `bash -e` script, a Python block on its own in a fresh
interpreter (so every Python block is complete: its imports and its `load`). The documented substitutions, the same
for every block:
- a PaliGemma hub id (`google/paligemma...`, `mlx-community/paligemma...`) -> the tiny test checkpoint of its family,
  tests/fixtures/paligemma2-tiny or tests/fixtures/paligemma-tiny;
- an http(s) URL of an image -> examples/images/chelsea.jpg;
- `--max-tokens N` and `max_tokens=N` -> at most 8, and generate, batch and evaluate commands get `--max-tokens 8`
  when they give none (the tiny random models rarely stop); `--iters N` -> 2;
- installs (`pip install`, `apt-get`, `brew`) and the test command (`python -m pytest`) are skipped: this test runs
  in the installed environment, inside that test command;
- a server command (`python -m mlx_paligemma.server`) starts in the background on a free port, which replaces
  127.0.0.1:8080 in the page's later blocks, and stops at the end of the page.
A block right after `<!-- not run: why -->` is not run (a Mac, a download, several machines, a long benchmark);
the reason must be given. The figures: `python -m pytest -q -s tests/test_docs.py` prints them per page.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
COPIED = ["examples", "tests/fixtures", "convert.py"]  # what the blocks read, copied into each page's folder
TIMEOUT = 300

FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
HUB_ID = re.compile(r"\b(?:google|mlx-community)/paligemma(2?)[\w.-]*")
IMAGE_URL = re.compile(r"https?://\S+?\.(?:jpe?g|png)\b", re.IGNORECASE)
COMMAND = re.compile(r"(python -m mlx_paligemma\.(?:generate|batch|evaluate)|mlx-paligemma-(?:generate|batch|evaluate))")
SKIPPED = re.compile(r"^\s*(sudo\s+)?(pip3? install|python -m pip install|apt-get|apt|brew|python -m pytest)\b")
SERVER = re.compile(r"^\s*(python -m mlx_paligemma\.server|mlx-paligemma-server)\b")


def blocks(page: Path):
    """(line number, language, code, reason not to run or None) of every fenced block."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = NOT_RUN.match(before)
        found.append((start + 1, lang, "\n".join(lines[start + 1:end]) + "\n", marked.group(1) if marked else None))
        i = end + 1
    return found


def substitute(code: str, port: int) -> str:
    code = HUB_ID.sub(lambda m: f"tests/fixtures/paligemma{m.group(1)}-tiny", code)
    code = IMAGE_URL.sub("examples/images/chelsea.jpg", code)
    code = re.sub(r"--max-tokens[ =](\d+)", lambda m: f"--max-tokens {min(int(m.group(1)), 8)}", code)
    code = re.sub(r"\bmax_tokens=(\d+)", lambda m: f"max_tokens={min(int(m.group(1)), 8)}", code)
    code = re.sub(r"--iters[ =]\d+", "--iters 2", code)
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def shell_lines(code: str) -> list:
    """Logical lines (continuations joined), installs and the test command dropped from `&&` chains, generate,
    batch and evaluate given at most 8 tokens."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        if "&&" in line:
            kept = [part for part in line.split("&&") if not SKIPPED.match(part)]
            line = " && ".join(p.strip() for p in kept) if kept else ":"
        elif SKIPPED.match(line):
            line = ":"
        out.append(COMMAND.sub(r"\1 --max-tokens 8", line))  # argparse keeps the last: the line's own still counts
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(line: str, folder: Path, env: dict, port: int) -> subprocess.Popen:
    line = re.sub(r"--port[ =]\d+", "", re.sub(r"\s+#.*$", "", line)) + f" --port {port}"
    server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server stopped: {server.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise AssertionError("the server did not answer /health within 120 s")


def run(argv: list, folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_blocks_run(page, tmp_path):
    for name in COPIED:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLX_PALIGEMMA_DEBUG", None)
    port, servers, failures, timings, counts = free_port(), [], [], [], {"run": 0, "not run": 0}
    tic = time.monotonic()
    try:
        for line_no, lang, code, reason in blocks(page):
            if lang not in ("bash", "python"):
                continue
            if reason is not None:
                assert reason, f"{page.name}:{line_no}: say why the block is not run"
                counts["not run"] += 1
                continue
            counts["run"] += 1
            code, started = substitute(code, port), time.monotonic()
            if lang == "python":
                done = [run([sys.executable, "-c", code], tmp_path, env)]
            else:
                done, script = [], []
                for line in shell_lines(code) + [None]:
                    if line is not None and not SERVER.match(line):
                        script.append(line)
                        continue
                    if script:
                        done.append(run(["bash", "-e", "-c", "\n".join(script)], tmp_path, env))
                        script = []
                    if line is not None:
                        servers.append(start_server(line, tmp_path, env, port))
            timings.append((time.monotonic() - started, line_no))
            for r in done:
                if r.returncode != 0:
                    failures.append(f"{page.name}:{line_no} ({lang}) exit {r.returncode}:\n{code}\n"
                                    f"{(r.stdout + r.stderr)[-1500:]}")
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"\n{page.relative_to(ROOT)}: {counts['run']} blocks run, {counts['not run']} marked not run, "
          f"{time.monotonic() - tic:.1f} s (slowest: " + ", ".join(f"line {n} {s:.1f} s" for s, n in
                                                     sorted(timings, reverse=True)[:3]) + ")")
    assert not failures, "\n\n".join(failures)
