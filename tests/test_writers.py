"""One writer under every output (formats.atomic, formats.ownership): a new file, or one it wrote itself, known by
its folder's record; never someone's file, never through a link; whole or not at all; its temporaries gone after an
error, Ctrl-C, SIGTERM, and (after SIGKILL) on the next run. A hostile tester's cases on the tiny checkpoint, each
checked byte for byte, then the fine-tuning reruns that once refused with advice that did not work.

A refusal comes before the model loads: those cases name a model that does not exist."""

import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import FIXTURES
from mlx_paligemma import evaluate, lora
from mlx_paligemma.errors import InputError
from mlx_paligemma.formats.atomic import GrowingFile, atomic_file, check_file_output
from mlx_paligemma.formats.ownership import RECORD, check_file
from mlx_paligemma.tasks import report
from mlx_paligemma.training import trainer

generate = importlib.import_module("mlx_paligemma.generate")  # the package's `generate` is the function
ROOT = Path(__file__).resolve().parents[1]
MODEL = str(FIXTURES / "paligemma2-tiny")
NEVER = "missing-model-never-loaded"  # a refusal before the model loads never looks for it
IMAGES = FIXTURES / "images"
TEMPORARY = re.compile(r"\.(partial|old)-\d+")


def listing(folder: Path) -> dict:
    """Every entry under `folder`, links as links: file contents by hash, folders as such, where links point."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            out[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[name] = "folder"
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def caption_data(folder: Path) -> Path:
    shutil.copy(IMAGES / "chelsea.jpg", folder / "chelsea.jpg")
    (folder / "test.jsonl").write_text(json.dumps({"image": "chelsea.jpg", "prefix": "caption en",
                                                   "suffix": "a cat"}) + "\n")
    return folder / "test.jsonl"


# --- evaluate --output and --predictions ---

def test_evaluate_refuses_someones_notes_before_the_model_loads(tmp_path, capsys):
    data = caption_data(tmp_path)
    (tmp_path / "notes.json").write_text('{"my": "notes"}\n')
    (tmp_path / "notes.jsonl").write_text('{"my": "lines"}\n')
    before = listing(tmp_path)
    for flag, name in (("--output", "notes.json"), ("--predictions", "notes.jsonl")):
        assert evaluate.main(["--model", NEVER, "--data", str(data), flag, str(tmp_path / name)]) == 1
        assert error_line(capsys) == (f"error: {flag} {tmp_path / name}: was not written by mlx-paligemma; remove "
                                      "it, or give another path")
    assert listing(tmp_path) == before  # no record, no temporary: a refusal writes nothing


def test_evaluate_replaces_its_own_outputs_but_not_once_someone_edited_them(tmp_path, capsys):
    data = caption_data(tmp_path)
    outputs = ["--output", str(tmp_path / "notes.json"), "--predictions", str(tmp_path / "notes.jsonl")]
    base = ["--data", str(data), "--max-tokens", "4", *outputs]
    assert evaluate.main(["--model", MODEL, *base]) == 0
    assert evaluate.main(["--model", MODEL, *base]) == 0  # a rerun: the record says both are ours
    assert json.loads((tmp_path / "notes.json").read_text())["model"] == MODEL
    capsys.readouterr()
    with open(tmp_path / "notes.json", "a") as f:
        f.write("my remark\n")
    before = listing(tmp_path)
    assert evaluate.main(["--model", NEVER, *base]) == 1
    assert error_line(capsys) == (f"error: --output {tmp_path / 'notes.json'}: has changed since mlx-paligemma wrote "
                                  "it; remove it, or give another path")
    assert listing(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted([RECORD, "chelsea.jpg", "notes.json", "notes.jsonl", "test.jsonl"])


# --- generate --draw ---

def test_generate_draw_refuses_an_unrelated_photo_before_the_model_loads(tmp_path, capsys):
    shutil.copy(IMAGES / "coffee.jpg", tmp_path / "vacation.jpg")
    before = listing(tmp_path)
    assert generate.main(["--model", NEVER, "--image", str(IMAGES / "chelsea.jpg"), "--prompt", "detect cat",
                          "--draw", str(tmp_path / "vacation.jpg")]) == 1
    assert error_line(capsys) == (f"error: --draw {tmp_path / 'vacation.jpg'}: was not written by mlx-paligemma; "
                                  "remove it, or give another path")
    assert listing(tmp_path) == before


def test_generate_draw_replaces_its_own_drawing(tmp_path, capsys):
    argv = ["--model", MODEL, "--image", str(IMAGES / "chelsea.jpg"), "--prompt", "detect cat", "--max-tokens", "4",
            "--draw", str(tmp_path / "out.png")]
    assert generate.main(argv) == 0
    first = (tmp_path / "out.png").stat().st_mtime_ns
    assert generate.main(argv) == 0
    assert (tmp_path / "out.png").stat().st_mtime_ns != first
    assert sorted(os.listdir(tmp_path)) == [RECORD, "out.png"]


# --- links: never followed, never replaced ---

@pytest.mark.parametrize("option", ["--report", "--output", "--draw"])
def test_a_link_where_an_output_goes_is_refused_and_left_as_it_is(tmp_path, capsys, option):
    data = caption_data(tmp_path)
    if option == "--report":
        (tmp_path / "empty").mkdir()
        link = tmp_path / "rep"
        link.symlink_to(tmp_path / "empty")
    else:
        # A link to a file this package wrote is still a link: the write would land elsewhere.
        with atomic_file(tmp_path / "ours.png") as tmp:
            shutil.copy(IMAGES / "rgba.png", tmp)
        link = tmp_path / "link.png"
        link.symlink_to(tmp_path / "ours.png")
    before = listing(tmp_path)
    if option == "--draw":
        rc = generate.main(["--model", NEVER, "--image", str(IMAGES / "chelsea.jpg"), "--prompt", "caption en",
                            "--draw", str(link)])
    else:
        rc = evaluate.main(["--model", NEVER, "--data", str(data), option, str(link)])
    line = error_line(capsys)
    assert rc == 1 and line == {
        "--report": f"error: --report {link}: is a link, not a folder; give the folder itself, or a new path",
        "--output": f"error: --output {link}: is a link, not a file mlx-paligemma wrote; remove it, or give another "
                    "path",
        "--draw": f"error: --draw {link}: is a link, not a file mlx-paligemma wrote; remove it, or give another path",
    }[option]
    assert listing(tmp_path) == before and link.is_symlink()


# --- stopped, terminated and killed writers ---

SLOW_REPORT = """
import sys, time
from mlx_paligemma.cli import run_main
from mlx_paligemma.tasks import report

def slow(self, shown):  # a page of its own (the writer is under test, not the page), then a wait mid-write
    (self.folder / "images").mkdir()
    (self.folder / "images" / "00000.jpg").write_bytes(b"a thumbnail")
    print("writing", flush=True)
    time.sleep(120)
    return "<p>a report</p>"

report._Page.html = slow
run_main(lambda: print(report.write_report(sys.argv[1], {}, [], [])))
"""

SLOW_FILE = """
import sys, time
from mlx_paligemma.cli import run_main
from mlx_paligemma.formats.atomic import atomic_file

def write():
    with atomic_file(sys.argv[1], "--output") as tmp:
        tmp.write_text("the new version\\n")
        print("writing", flush=True)
        time.sleep(120)

run_main(write)
"""


def first_version(kind: str, target: Path) -> None:
    """What a completed earlier run wrote at `target`: a report, or a file."""
    if kind == "report":
        child = SLOW_REPORT.replace("time.sleep(120)", "pass")
        subprocess.run([sys.executable, "-c", child, str(target)], cwd=ROOT, check=True, capture_output=True,
                       timeout=300)
    else:
        with atomic_file(target) as tmp:
            tmp.write_text("the first version\n")


def start_writer(kind: str, target: Path) -> subprocess.Popen:
    """A writer in a real process, stopped mid-write: returns once it says it is writing (or fails if it never
    does within the guard's bound)."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_REPORT if kind == "report" else SLOW_FILE, str(target)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             # Ctrl-C's default meaning, even under a parent that ignores SIGINT
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    guard = threading.Timer(300, child.kill)  # bounded: a child that never writes is killed and fails below
    guard.start()
    try:
        line = child.stdout.readline()
    finally:
        guard.cancel()
    assert line == "writing\n", child.communicate()[1]
    return child


@pytest.mark.parametrize("kind", ["report", "file"])
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_or_terminated_writer_removes_its_temporaries(tmp_path, kind, signum, code):
    target = tmp_path / ("rep" if kind == "report" else "notes.json")
    first_version(kind, target)
    before = listing(tmp_path)
    child = start_writer(kind, target)
    assert any(TEMPORARY.search(name) for name in os.listdir(tmp_path))  # mid-write: its temporary is there
    child.send_signal(signum)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert listing(tmp_path) == before  # the earlier version whole, and nothing else


@pytest.mark.parametrize("kind", ["report", "file"])
def test_what_a_killed_writer_left_is_removed_by_the_next_run(tmp_path, capsys, kind):
    target = tmp_path / ("rep" if kind == "report" else "notes.json")
    first_version(kind, target)
    before = listing(tmp_path)
    child = start_writer(kind, target)
    child.kill()
    child.communicate(timeout=60)
    left = [name for name in os.listdir(tmp_path) if TEMPORARY.search(name)]
    assert left and str(child.pid) in left[0]  # SIGKILL leaves the temporary, under its process's id
    # The next run's check, before any work, removes it (its process is gone) and leaves the earlier version.
    (tmp_path / "data").mkdir()
    data = caption_data(tmp_path / "data")
    option = "--report" if kind == "report" else "--output"
    assert evaluate.main(["--model", NEVER, "--data", str(data), option, str(target)]) == 1
    assert "missing-model-never-loaded" in capsys.readouterr().err  # it got as far as loading the model
    assert {k: v for k, v in listing(tmp_path).items() if not k.startswith("data")} == before


def test_a_live_writers_temporary_is_refused_not_removed(tmp_path):
    target = tmp_path / "notes.json"
    child = start_writer("file", target)
    try:
        with pytest.raises(InputError, match=rf"^{target} is being written by another process \(pid {child.pid}\)"):
            check_file_output(target, "--output")
    finally:
        child.kill()
        child.communicate(timeout=60)


# --- the record ---

def test_a_record_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    for make in (lambda p: p.write_text("my notes\n"), lambda p: p.mkdir(), lambda p: p.symlink_to("notes.json")):
        make(tmp_path / RECORD)
        with pytest.raises(InputError, match=rf"^{tmp_path / RECORD} is .*, where mlx-paligemma keeps the list of "
                                             "the files it wrote in .*; move it away$"):
            check_file_output(tmp_path / "out.json", "--output")
        p = tmp_path / RECORD
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()


def test_the_record_itself_is_no_output(tmp_path, capsys):
    data = caption_data(tmp_path)
    assert evaluate.main(["--model", NEVER, "--data", str(data), "--output", str(tmp_path / RECORD)]) == 1
    assert error_line(capsys) == (f"error: --output {tmp_path / RECORD}: is the name of the record mlx-paligemma "
                                  "keeps in each folder it writes in; give another path")


def test_a_growing_file_is_ours_while_it_begins_as_recorded(tmp_path):
    log = GrowingFile(tmp_path / "log.jsonl", '{"iteration": 1}\n')
    log.write('{"iteration": 2}\n')
    log.close()
    check_file(tmp_path / "log.jsonl")
    with open(tmp_path / "log.jsonl", "a") as f:  # a kill between a line and its record leaves one more line
        f.write('{"iteration": 3}\n')
    check_file(tmp_path / "log.jsonl")
    (tmp_path / "log.jsonl").write_text('{"iteration": 9}\n{"iteration": 2}\n{"iteration": 3}\n')  # same size
    with pytest.raises(InputError, match="log.jsonl has changed since mlx-paligemma wrote it"):
        check_file(tmp_path / "log.jsonl")


def test_a_copy_that_keeps_times_stays_ours_and_one_that_does_not_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with atomic_file(tmp_path / "a" / "out.json") as tmp:
        tmp.write_text("{}\n")
    shutil.copytree(tmp_path / "a", tmp_path / "kept")  # copy2: times kept, as cp -p and rsync -a keep them
    check_file(tmp_path / "kept" / "out.json")
    (tmp_path / "plain").mkdir()
    for name in ("out.json", RECORD):
        shutil.copy(tmp_path / "a" / name, tmp_path / "plain" / name)  # times not kept
    with pytest.raises(InputError, match="out.json has changed since mlx-paligemma wrote it"):
        check_file(tmp_path / "plain" / "out.json")


# --- fine-tuning: reruns, and advice that works ---

def train_argv(data: Path, adapters: Path, *more) -> list:
    return ["--model", MODEL, "--data", str(data), "--adapter-path", str(adapters), "--iters", "2", "--batch-size",
            "1", "--lora-rank", "4", "--steps-per-report", "1", *more]


def flags_in(line: str) -> list:
    return re.findall(r"--[a-z][a-z-]*", line)


def test_lora_stopped_before_its_first_checkpoint_reruns_and_resumes(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"image": str(IMAGES / name), "prefix": "caption en",
                                                          "suffix": text}) + "\n"
                                              for name, text in (("chelsea.jpg", "a cat"), ("coffee.jpg", "a cup"))))

    def stopped(*args, **kwargs):  # Ctrl-C as the first checkpoint is about to be written
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        lora.main(train_argv(data, tmp_path / "a"))
    monkeypatch.undo()
    assert (tmp_path / "a" / "log.jsonl").is_file() and not (tmp_path / "a" / trainer.STATE_FILE).exists()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same stopped run, twice
    capsys.readouterr()
    assert lora.main(train_argv(data, tmp_path / "a")) == 0  # a rerun starts again over its own unfinished run
    assert lora.main(train_argv(data, tmp_path / "b", "--resume")) == 0  # --resume too, from step 1
    out = capsys.readouterr().out
    assert f"No checkpoint in {tmp_path / 'b'} yet: training from step 1" in out and "Resumed from" not in out
    for folder in ("a", "b"):
        assert json.loads((tmp_path / folder / trainer.STATE_FILE).read_text())["step"] == 2
        assert [e["iteration"] for e in json.loads("[" + ",".join(
            (tmp_path / folder / "log.jsonl").read_text().splitlines()) + "]")] == [1, 2]
    # Now a checkpoint is there: a rerun is refused, and each flag its advice names is one the command takes.
    before = listing(tmp_path / "a")
    assert lora.main(train_argv(data, tmp_path / "a")) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'a'} already holds adapters (") and listing(tmp_path / "a") == before
    assert flags_in(line) == ["--resume", "--overwrite", "--adapter-path"]
    assert set(flags_in(line)) <= set(lora.build_parser().flags())
    assert lora.main(train_argv(data, tmp_path / "a", "--iters", "3", "--resume")) == 0
    assert lora.main(train_argv(data, tmp_path / "a", "--overwrite")) == 0


def test_lora_resume_with_nothing_there_says_how_to_start(tmp_path, capsys):
    assert lora.main(train_argv(tmp_path, tmp_path / "new", "--resume")) == 1
    line = error_line(capsys)
    assert line == (f"error: nothing to resume in {tmp_path / 'new'}: no checkpoint and nothing of an earlier run; "
                    "leave out --resume to start training there")


def test_the_readme_fine_tuning_example_reruns_with_the_advice_it_gives(tmp_path):
    def example(*more):
        return subprocess.run([sys.executable, str(ROOT / "examples" / "finetune.py"), "--model",
                               str(FIXTURES / "paligemma-tiny"), "--output", "ft", "--iters", "2", *more],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert example().returncode == 0
    again = example()
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 1 and len(lines) == 1 and "Traceback" not in again.stderr, again.stderr
    assert lines[0].startswith("error: ft/adapters already holds adapters (")
    assert "loaded" not in again.stdout  # refused before the model loads
    assert set(flags_in(lines[0])) <= set(flags_in(example("--help").stdout))  # advice the example takes
    resumed = example("--resume", "--iters", "4")
    assert resumed.returncode == 0 and "Resumed from ft/adapters at step 2" in resumed.stdout, resumed.stderr
    assert example("--overwrite").returncode == 0
