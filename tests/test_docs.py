"""Every ```bash and ```python block of README.md and docs/*.md runs, and every ```console block shows what its
commands print, so a recipe or a shown output that drifts fails.

Each page runs in its own temporary folder holding a copy of what the docs name (examples/, tests/fixtures/,
convert.py), its blocks in order. A command line `python -m mlx_paligemma.NAME ...` (or `mlx-paligemma-NAME`) with
no shell syntax runs in this process, through the command's `main`; the other lines of a bash block run together as
one `bash -e` script; a Python block runs in this process in a namespace of its own (so every Python block is
complete: its imports and its `load`). The documented substitutions, the same for every block:
- a PaliGemma hub id (`google/paligemma...`, `mlx-community/paligemma...`) -> the tiny test checkpoint of its family,
  tests/fixtures/paligemma2-tiny or tests/fixtures/paligemma-tiny;
- an http(s) URL of an image -> examples/images/chelsea.jpg;
- `--max-tokens N` and `max_tokens=N` -> at most 8, and generate, batch and evaluate commands get `--max-tokens 8`
  when they give none (the tiny random models rarely stop); on a line naming a hub id, `--iters N` -> 2 (a line
  naming a tiny checkpoint itself runs as written);
- installs (`pip install`, `apt-get`, `brew`) and the test command (`python -m pytest`) are skipped: this test runs
  in the installed environment, inside that test command;
- a server command (`python -m mlx_paligemma.server`) starts in the background on a free port, which replaces
  127.0.0.1:8080 in the page's later blocks, and stops at the end of the page.
A block right after `<!-- not run: why -->` is not run (a Mac, a download, several machines, a long benchmark);
the reason must be given.

A ```console block is a shown output: each `$ COMMAND` line runs (stdout and stderr together) and what it prints
must have the shape of the lines shown below it: a JSON line the same keys, list lengths and value kinds (so the
same number of objects, each with a box of four numbers); any other line the same words and whole numbers, each
decimal number or time standing for any other; `...` stands for any lines.
The figures: `python -m pytest -q -s tests/test_docs.py` prints them per page.
"""

import faulthandler
import importlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
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
COMMAND = re.compile(r"(python -m mlx_paligemma\.(?:generate|batch|evaluate)|"
                     r"mlx-paligemma-(?:generate|batch|evaluate))")
SKIPPED = re.compile(r"^\s*(sudo\s+)?(pip3? install|python -m pip install|apt-get|apt|brew|python -m pytest)\b")
SERVER = re.compile(r"^\s*(python -m mlx_paligemma\.server|mlx-paligemma-server)\b")
IN_PROCESS = re.compile(r"^\s*(?:python -m mlx_paligemma\.|mlx-paligemma-)(generate|batch|evaluate|lora|convert|export)"
                        r"(\s.*)?$")
NUMBER = re.compile(r"\d+:\d\d:\d\d|\d+\.\d+(?:e[-+]?\d+)?")  # decimals and times: any value of the kind


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
    code = re.sub(r"--iters[ =]\d+", lambda m: "--iters 2" if HUB_ID.search(code) else m.group(0), code)
    code = HUB_ID.sub(lambda m: f"tests/fixtures/paligemma{m.group(1)}-tiny", code)
    code = IMAGE_URL.sub("examples/images/chelsea.jpg", code)
    code = re.sub(r"--max-tokens[ =](\d+)", lambda m: f"--max-tokens {min(int(m.group(1)), 8)}", code)
    code = re.sub(r"\bmax_tokens=(\d+)", lambda m: f"max_tokens={min(int(m.group(1)), 8)}", code)
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def shell_lines(code: str, port: int) -> list:
    """Logical lines (continuations joined), each substituted, installs and the test command dropped from `&&`
    chains, generate, batch and evaluate given at most 8 tokens."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        line = substitute(line, port)
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


def in_process(folder: Path, work) -> tuple:
    """(exit code, stdout and stderr together) of `work()` run in `folder`; a run past TIMEOUT ends the test
    process with every thread's traceback, so a hang cannot stall the suite."""
    out, cwd = io.StringIO(), os.getcwd()
    faulthandler.dump_traceback_later(TIMEOUT, exit=True)
    os.chdir(folder)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            code = work() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # a bug, or a block that raises: shown with its traceback
        code = 2
        out.write(traceback.format_exc())
    finally:
        os.chdir(cwd)
        faulthandler.cancel_dump_traceback_later()
    return code, out.getvalue()


def run_command(line: str, folder: Path) -> tuple:
    m = IN_PROCESS.match(line)
    main = importlib.import_module(f"mlx_paligemma.{m.group(1)}").main
    return in_process(folder, lambda: main(shlex.split(m.group(2) or "", comments=True)))


def run_python(code: str, where: str, folder: Path) -> tuple:
    return in_process(folder, lambda: exec(compile(code, where, "exec"), {"__name__": "__main__"}))


def run_bash(script: str, folder: Path, env: dict) -> tuple:
    r = subprocess.run(["bash", "-e", "-c", script], cwd=folder, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    return r.returncode, r.stdout


def runs_in_process(line: str) -> bool:
    """A command with no shell syntax outside quotes (operators, redirections, expansions)."""
    if not IN_PROCESS.match(line) or "$" in line or "`" in line:
        return False
    tokens = list(shlex.shlex(line, posix=True, punctuation_chars=True))
    return not any(set(t) <= set("();<>|&") for t in tokens)


def run_lines(lines: list, folder: Path, env: dict, start) -> list:
    """(exit code, output) of each piece: in-process command lines one by one, the lines between them as one bash
    script, a server started in the background (by `start`)."""
    done, script = [], []
    for line in lines + [None]:
        if line is not None and not SERVER.match(line) and not runs_in_process(line):
            script.append(line)
            continue
        if script:
            done.append(run_bash("\n".join(script), folder, env))
            script = []
        if line is None:
            break
        done.append(run_command(line, folder) if runs_in_process(line) else start(line))
    return done


# Shown outputs.

def shape(value):
    """What a JSON value shows: keys, list lengths, kinds; not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def line_shape(line: str):
    line = line.strip()
    if line[:1] in "{[":
        try:
            return shape(json.loads(line))
        except ValueError:
            pass
    return NUMBER.sub("#", line)


def same_shape(shown: list, got: list) -> bool:
    """`got` has the lines `shown` shows, in order, `...` standing for any lines between them."""
    if not shown:
        return not got
    if shown[0].strip() == "...":
        return any(same_shape(shown[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and line_shape(shown[0]) == line_shape(got[0]) and same_shape(shown[1:], got[1:])


def shown_runs(code: str) -> list:
    """(command, the lines shown after it) of a console block."""
    runs = []
    for line in code.splitlines():
        if line.startswith("$ "):
            runs.append((line[2:], []))
        elif runs and line.strip():
            runs[-1][1].append(line)
    return runs


def check_shown(code: str, where: str, folder: Path, env: dict, port: int) -> list:
    failures = []
    for command, shown in shown_runs(code):
        line = shell_lines(command, port)[0]
        code_, output = run_command(line, folder) if runs_in_process(line) else run_bash(line, folder, env)
        got = [g for g in output.splitlines() if g.strip()]
        if code_ != 0 or not same_shape(shown, got):
            failures.append(f"{where}: `$ {command}` (exit {code_}) prints\n" + "\n".join(got[-30:])
                            + "\n\nwhere the page shows\n" + "\n".join(shown))
    return failures


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_blocks_run(page, tmp_path):
    for name in COPIED:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLX_PALIGEMMA_DEBUG", None)
    port, servers, failures, timings, counts = free_port(), [], [], [], {"run": 0, "not run": 0}

    def start(line):
        servers.append(start_server(line, tmp_path, env, port))
        return 0, ""

    tic = time.monotonic()
    try:
        for line_no, lang, code, reason in blocks(page):
            if lang not in ("bash", "python", "console"):
                continue
            if reason is not None:
                assert reason, f"{page.name}:{line_no}: say why the block is not run"
                counts["not run"] += 1
                continue
            counts["run"] += 1
            started, where = time.monotonic(), f"{page.name}:{line_no}"
            if lang == "console":
                failures += check_shown(code, where, tmp_path, env, port)
            else:
                done = ([run_python(substitute(code, port), where, tmp_path)] if lang == "python" else
                        run_lines(shell_lines(code, port), tmp_path, env, start))
                failures += [f"{where} ({lang}) exit {c}:\n{code}\n{out[-1500:]}" for c, out in done if c != 0]
            timings.append((time.monotonic() - started, line_no))
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


def test_shown_output_compares_shapes():
    shown = ['{"answer": "x", "objects": [{"label": "cat", "box": [1.0, 2, 3, 4], "score": 0.5}]}',
             "5 items (4 answers, 1 error) in 0:00:02: 2.01 items/s", "..."]
    good = ['{"answer": "y", "objects": [{"label": "dog", "box": [9, 8, 7, 6.5], "score": 1.0}]}',
            "5 items (4 answers, 1 error) in 0:01:12: 13.50 items/s", "more", "lines"]
    assert same_shape(shown, good)
    assert not same_shape(shown, [good[0].replace(', "score": 1.0', "")] + good[1:])  # a key missing
    assert not same_shape(shown, ['{"answer": "y", "objects": []}'] + good[1:])  # no box
    assert not same_shape(shown, [good[0], "5 items (5 answers, 0 errors) in 0:00:02: 2.01 items/s"])  # counts
    assert not same_shape(shown[:2], good)  # lines the page does not show, with no `...`
