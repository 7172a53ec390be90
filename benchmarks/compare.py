"""Times this checkout against another commit, side by side, on three workloads of the tiny test model.

    python benchmarks/compare.py 0e020f0                        # 5 processes a side per workload
    python benchmarks/compare.py 3d79f0d --repeats 9 --workloads batch
    python benchmarks/compare.py 5d231eb --this aa21597         # two commits, neither of them this checkout

REV is exported with `git archive` into a temporary folder. Each measurement is a fresh `python` whose PYTHONPATH
is one tree (this checkout as it is on disk, uncommitted changes included, or REV), alternating this, REV, this,
REV, ... so that a shared machine's drift falls on both sides alike. A process loads the model, runs its workload
once to warm up (MLX compiles kernels on first use) and reports the median of --runs timed runs; the table gives
the median over processes and the ratio this/REV (below 1: this checkout is faster), in wall-clock seconds or,
with --clock cpu, in CPU seconds of the process doing the work, which other load on a shared machine disturbs
less, or with --clock instructions in instructions executed, counted by valgrind (callgrind.py), which it does not
move at all. Workloads, all greedy:
- single: `generate`, one prompt, --tokens tokens;
- batch: `batch_generate`, 8 prompts about two photos, --tokens tokens each (no answer ends sooner at 100);
- server: `python -m mlx_paligemma.server` on 127.0.0.1 and --clients concurrent chat completions of --tokens
  tokens from OpenAI's Python client, all sent at once.
The scripts use the package's top level only (`load`, `generate`, `batch_generate`), so older commits whose
modules lay flat run them too; an answer may be a str or carry `.text`, a batch a list or carry `.texts`. The
sides' answers are compared: a difference means they did different work, and the table says so.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import callgrind  # benchmarks/callgrind.py and serving.py, beside this script
import serving

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "paligemma2-tiny"
IMAGES = ROOT / "tests" / "fixtures" / "images"
PROMPTS = [("caption en", "chelsea.jpg"), ("detect cat", "chelsea.jpg"), ("answer en what is this?", "coffee.jpg"),
           ("ocr", "coffee.jpg"), ("describe en", "chelsea.jpg"), ("segment cup", "coffee.jpg"),
           ("caption es", "coffee.jpg"), ("answer en is it a cat?", "chelsea.jpg")]
WORKLOADS = ("single", "batch", "server")
SERVER_START_S = 120  # the tiny model loads in seconds; a wedged server must not hold the run
REQUEST_TIMEOUT_S = 120


# The measuring side: runs in a fresh process against whichever tree PYTHONPATH names.

def text_of(result) -> str:
    return result if isinstance(result, str) else result.text


def texts_of(result) -> list:
    return result if isinstance(result, list) else list(result.texts)


def timed(work, runs: int, cpu_clock=time.process_time):
    """{seconds, cpu[, instructions]}: medians of `runs` timed calls after one warm-up, of the wall clock and of
    `cpu_clock` (the working process's CPU seconds, None where it cannot be read), and under callgrind the mean
    instructions of a call; and the last call's answers."""
    answers = work()
    counter = callgrind.Counter() if os.environ.get(callgrind.ENV) else None
    if counter:
        counter.start()
    wall, cpu = [], []
    for _ in range(runs):
        tic, cpu_tic = time.perf_counter(), cpu_clock()
        answers = work()
        wall.append(time.perf_counter() - tic)
        cpu.append(None if cpu_tic is None else cpu_clock() - cpu_tic)
    times = dict(seconds=statistics.median(wall), cpu=None if None in cpu else statistics.median(cpu))
    if counter:
        times["instructions"] = counter.stop() / runs
    return times, answers


def run_engine(workload: str, args) -> dict:
    import mlx_paligemma as mp  # before mlx: on Linux it loads OpenBLAS, which MLX binds when first imported
    from PIL import Image

    model, processor = mp.load(args.model)
    photos = {name: Image.open(IMAGES / name).convert("RGB") for _, name in PROMPTS}
    images, prompts = [photos[name] for _, name in PROMPTS], [prompt for prompt, _ in PROMPTS]

    def work():
        if workload == "single":
            return [text_of(mp.generate(model, processor, images[0], prompts[0], max_tokens=args.tokens))]
        return texts_of(mp.batch_generate(model, processor, images, prompts, max_tokens=args.tokens))

    times, answers = timed(work, args.runs)
    return dict(times, answers=answers)


def cpu_seconds(pid: int):
    """CPU seconds a process has used (user and system), from /proc; None where there is no /proc (macOS)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_server(args) -> dict:
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import openai

    with serving.served(args.model, "--batch-size", str(args.clients), "--log-level", "warning",
                        start_seconds=SERVER_START_S) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        urls = {name: "data:image/jpeg;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()
                for _, name in PROMPTS}
        asks = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]

        def ask(prompt_image):
            prompt, name = prompt_image
            content = [{"type": "image_url", "image_url": {"url": urls[name]}}, {"type": "text", "text": prompt}]
            r = client.chat.completions.create(model=args.model, max_tokens=args.tokens, temperature=0.0,
                                               messages=[{"role": "user", "content": content}])
            return r.choices[0].message.content

        with ThreadPoolExecutor(args.clients) as pool:
            times, answers = timed(lambda: list(pool.map(ask, asks)), args.runs, lambda: cpu_seconds(server.pid))
        return dict(times, answers=answers)


def measure_main(argv) -> None:
    if os.environ.get(callgrind.ENV):
        callgrind.allow_rlimit_requests()
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--runs", type=int, required=True)
    args = p.parse_args(argv)
    r = run_server(args) if args.workload == "server" else run_engine(args.workload, args)
    digest = hashlib.sha256(json.dumps(r.pop("answers")).encode()).hexdigest()[:12]
    print(json.dumps(dict(r, digest=digest)))


# The comparing side.

def commit_of(rev: str) -> str:
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {rev!r} is not a commit of {ROOT}")
    return r.stdout.strip()


def export(commit: str, folder: Path) -> Path:
    """The commit's files, as `git archive` writes them, in `folder`."""
    archive = folder / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, stdout=out, check=True)
    tree = folder / commit[:12]
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    return tree


def measure(tree: Path, workload: str, args):
    """{seconds, cpu, digest[, instructions]} from one fresh process running `tree`'s package, or None (its last
    error line shown). With --clock instructions the engine workloads run under callgrind."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    counted = args.clock == "instructions" and workload != "server"
    if counted:
        # One BLAS thread: threads that spin while they wait would add counts that vary from run to run.
        env.update({callgrind.ENV: str(args.helper), "OPENBLAS_NUM_THREADS": "1"})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", workload, "--model", args.model,
           "--tokens", str(args.tokens), "--clients", str(args.clients), "--runs", str(args.runs)]
    if counted:
        cmd = callgrind.command(args.helper) + cmd
    try:
        r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"[compare] {workload} in {tree}: over {args.timeout} s, stopped", file=sys.stderr, flush=True)
        return None
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"[compare] {workload} in {tree}: {tail}", file=sys.stderr, flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def label(workload: str, args) -> str:
    return {"single": f"single stream, 1 x {args.tokens} tokens",
            "batch": f"batch_generate, {len(PROMPTS)} x {args.tokens} tokens",
            "server": f"server, {args.clients} concurrent x {args.tokens} tokens"}[workload]


CLOCKS = {"wall": ("seconds", "wall-clock seconds", "s"), "cpu": ("cpu", "CPU seconds of the working process", "s"),
          "instructions": ("instructions", "instructions of the working process, millions", "M")}


def fmt(values, key: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) / 1e6:.1f}" if key == "instructions" else f"{statistics.median(values):.3f}"


def report(results, names, args) -> None:
    import platform

    this, rev = names
    key, clock, unit = CLOCKS[args.clock]
    each = "mean" if key == "instructions" else "median"
    print(f"\n{Path(args.model).name}, {clock}: medians of {args.repeats} alternated processes a side (each the "
          f"{each} of {args.runs} timed runs after a warm-up), {platform.machine()} {platform.system()}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"| workload | {this} {unit} | {rev} {unit} | {this}/{rev} | paired ratios min-max | same answers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in args.workloads:
        a, b = results[workload]
        value = lambda r: r and r.get(key)  # noqa: E731  (None: failed, or no such clock there)
        sa, sb = [value(r) for r in a if value(r)], [value(r) for r in b if value(r)]
        pairs = [value(x) / value(y) for x, y in zip(a, b) if value(x) and value(y)]
        ratio = f"{statistics.median(sa) / statistics.median(sb):.3f}" if sa and sb else "-"
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"
        digests = {r["digest"] for r in a + b if r}
        same = "-" if not digests else "yes" if len(digests) == 1 else "NO: the sides did different work"
        print(f"| {label(workload, args)} | {fmt(sa, key)} | {fmt(sb, key)} | {ratio} | {spread} | {same} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the commit to compare against (a hash, tag or branch)")
    p.add_argument("--this", default=None, metavar="REV2",
                   help="time commit REV2 in place of this checkout (default: this checkout as it is on disk)")
    p.add_argument("--repeats", type=int, default=5, help="processes per side and workload (default 5)")
    p.add_argument("--runs", type=int, default=3, help="timed runs in each process, after a warm-up (default 3)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   help="which workloads (default: all three)")
    p.add_argument("--tokens", type=int, default=100, help="tokens per answer (default 100)")
    p.add_argument("--clients", type=int, default=8, help="concurrent requests of the server workload (default 8)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="what the table compares: wall-clock seconds; the CPU seconds of the process doing the work "
                        "(the server's for the server workload, Linux only there), steadier on a busy machine; or "
                        "the instructions it executes, counted by valgrind (engine workloads, Linux), which other "
                        "load does not move (default wall)")
    p.add_argument("--model", default=str(MODEL), help="model folder (default: the tiny test model)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one process may take (default 600)")
    args = p.parse_args()
    for name in ("repeats", "runs", "tokens", "clients"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1")
    args.model = str(Path(args.model).resolve())
    rev = commit_of(args.rev)
    this = commit_of(args.this) if args.this else None
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        args.helper = Path(tmp)
        if args.clock == "instructions":
            callgrind.prepare(args.helper)
        trees = [export(this, Path(tmp)) if this else ROOT, export(rev, Path(tmp))]
        names = [args.this if this else "this", args.rev]
        results = {w: ([], []) for w in args.workloads}
        for n in range(args.repeats):
            for workload in args.workloads:
                for side, tree in enumerate(trees):
                    r = measure(tree, workload, args)
                    results[workload][side].append(r)
                    took = f"{r['seconds']:.3f} s, CPU {r['cpu'] or 0:.3f} s" if r else "failed"
                    print(f"round {n + 1} {workload} {names[side]}: {took}", file=sys.stderr, flush=True)
    report(results, names, args)


if __name__ == "__main__":
    main()
