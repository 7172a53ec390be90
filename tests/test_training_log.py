"""Training curves: ADAPTER_PATH/log.jsonl against train()'s history, resume after a kill, TensorBoard's own reader,
the plot, and the refusals (an unknown or missing tracker, someone's log, a damaged log)."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma import lora
from mlx_paligemma.training import trainer
from mlx_paligemma.errors import InputError
from mlx_paligemma.training.log import LOG_FILE, PLOT_FILE, TENSORBOARD_DIR, read_log

ROOT = Path(__file__).resolve().parents[1]
IMAGES = FIXTURES / "images"
TEACH = [("chelsea.jpg", "caption en", "a cat"), ("coffee.jpg", "caption en", "a cup of coffee")]
# How the test names each history number in TensorBoard (written here by hand, not taken from the module).
TAGS = {"train_loss": "train/loss", "learning_rate": "train/learning_rate",
        "steps_per_second": "train/steps_per_second", "tokens_per_second": "train/tokens_per_second",
        "peak_memory": "train/peak_memory_gb", "val_loss": "val/loss"}


def examples():
    return [trainer.Example(str(IMAGES / i), p, s) for i, p, s in TEACH]


def write_data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"image": str(IMAGES / i), "prefix": p, "suffix": s}) + "\n" for i, p, s in TEACH))
    return folder


def train_tiny(folder, iters, stop_after=None, **changes):
    """LoRA on the tiny checkpoint, the validation set the training set; `stop_after`: Ctrl-C after that line."""
    model, processor = mp.load(str(FIXTURES / "paligemma2-tiny"), dtype=mx.float32)
    mx.random.seed(0)
    config = trainer.add_lora(model, rank=4)
    args = trainer.TrainingArgs(**{**dict(iters=iters, batch_size=2, learning_rate=1e-3, steps_per_report=1,
                                          steps_per_eval=3, save_every=3, adapter_path=str(folder)), **changes})

    def report(line):
        if stop_after is not None and line.startswith(stop_after):
            raise KeyboardInterrupt

    try:
        return trainer.train(model, processor, examples(), examples(), args, adapter_config=config, report=report)
    except KeyboardInterrupt:
        return None


def scalars_of(folder):
    """{tag: [(step, value)]} as TensorBoard's own reader reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def kinds(entries):
    return [(e["iteration"], next(k for k in ("train_loss", "val_loss", "val_metrics") if k in e)) for e in entries]


def test_the_log_is_the_history_and_tensorboard_and_the_plot_hold_it(tmp_path):
    history = train_tiny(tmp_path, 6, steps_per_report=2, eval_task="caption", eval_max_tokens=4,
                         report_to=("tensorboard",))
    # Validation before the step at 1, every 3 and at the end; train reports every 2.
    assert kinds(history) == [(1, "val_loss"), (1, "val_metrics"), (2, "train_loss"), (3, "val_loss"),
                              (3, "val_metrics"), (4, "train_loss"), (6, "val_loss"), (6, "val_metrics"),
                              (6, "train_loss")]
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == history

    tensorboard = scalars_of(tmp_path)
    expected = {tag: [(h["iteration"], h[key]) for h in history if key in h] for key, tag in TAGS.items()}
    expected["val/caption cider"] = [(h["iteration"], h["val_metrics"]["score"]) for h in history if "val_metrics" in h]
    assert sorted(tensorboard) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in tensorboard[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tensorboard[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32

    with Image.open(tmp_path / PLOT_FILE) as png:
        assert png.format == "PNG" and png.width > 300
        assert len(png.convert("RGB").getcolors(1 << 16)) > 10  # curves drawn, not a blank canvas


def test_resume_keeps_each_step_once_with_an_uninterrupted_runs_values(tmp_path):
    whole = train_tiny(tmp_path / "whole", 8)
    # Cut after step 5's report: the checkpoint is at step 3, so the log holds steps 4 and 5 twice unless cut back.
    assert train_tiny(tmp_path / "cut", 8, stop_after="Iter 5: train loss", report_to=("tensorboard",)) is None
    assert [e["iteration"] for e in read_log(tmp_path / "cut" / LOG_FILE) if "train_loss" in e] == [1, 2, 3, 4, 5]
    train_tiny(tmp_path / "cut", 8, resume=True, report_to=("tensorboard",))
    log = read_log(tmp_path / "cut" / LOG_FILE)
    assert kinds(log) == kinds(whole)
    for ours, theirs in zip(log, whole):
        for key in ("train_loss", "val_loss", "learning_rate"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (ours["iteration"], key)
    tensorboard = scalars_of(tmp_path / "cut")
    assert [s for s, _ in tensorboard["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in tensorboard["val/loss"]] == [1, 3, 6, 8]


def test_overwrite_starts_a_new_log(tmp_path):
    train_tiny(tmp_path, 4)
    history = train_tiny(tmp_path, 2, overwrite=True)
    assert read_log(tmp_path / LOG_FILE) == history and kinds(history)[-1] == (2, "train_loss")


COMMAND = [sys.executable, "-m", "mlx_paligemma.lora"]


def options(*argv):
    return ["--model", str(FIXTURES / "paligemma2-tiny"), "--batch-size", "2", "--learning-rate", "1e-3", *argv]


def test_a_killed_run_resumes_with_each_step_in_the_log_once(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    args = ["--data", str(data), "--iters", "30", "--steps-per-report", "1", "--steps-per-eval", "10",
            "--save-every", "10", "--lora-rank", "4", "--adapter-path", str(tmp_path / "adapters")]
    run = subprocess.Popen(COMMAND + options(*args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    guard = threading.Timer(300, run.kill)  # bounded: a run that never reaches step 12 is killed and fails below
    guard.start()
    try:
        for line in run.stdout:
            if line.startswith("Iter 12: train loss"):  # after the checkpoint at step 10
                run.send_signal(signal.SIGKILL)
                break
        run.wait()
    finally:
        guard.cancel()
        run.stdout.close()
    assert run.returncode == -signal.SIGKILL
    checkpoint = json.loads((tmp_path / "adapters" / trainer.STATE_FILE).read_text())["step"]
    logged = [e["iteration"] for e in read_log(tmp_path / "adapters" / LOG_FILE) if "train_loss" in e]
    assert checkpoint == 10 and logged[:12] == list(range(1, 13))  # steps past the checkpoint are in the log
    assert lora.main(options(*args, "--resume")) == 0
    out = capsys.readouterr().out
    assert "Resumed from" in out and f"Plotted the curves to {tmp_path / 'adapters' / PLOT_FILE}" in out
    log = read_log(tmp_path / "adapters" / LOG_FILE)
    assert [e["iteration"] for e in log if "train_loss" in e] == list(range(1, 31))
    assert [e["iteration"] for e in log if "val_loss" in e] == [1, 10, 20, 30]
    assert [e["iteration"] for e in log] == sorted(e["iteration"] for e in log)


def test_ctrl_c_plots_the_curves_so_far(tmp_path):
    data = write_data(tmp_path / "data")
    run = subprocess.Popen(COMMAND + options("--data", str(data), "--iters", "1000", "--steps-per-report", "1",
                                             "--adapter-path", str(tmp_path / "a")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)},
                           # Ctrl-C's default meaning, even under a parent that ignores SIGINT (a shell's background
                           # job does): a process started so keeps ignoring it, as nohup users expect.
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    guard = threading.Timer(300, run.kill)
    guard.start()
    try:
        for line in run.stdout:
            if line.startswith("Iter 3: train loss"):
                run.send_signal(signal.SIGINT)
                break
        out, err = run.communicate()
    finally:
        guard.cancel()
    assert run.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert f"Plotted the curves to {tmp_path / 'a' / PLOT_FILE}" in out
    assert [e["iteration"] for e in read_log(tmp_path / "a" / LOG_FILE) if "train_loss" in e][:3] == [1, 2, 3]
    with Image.open(tmp_path / "a" / PLOT_FILE) as png:
        assert png.format == "PNG"


def test_an_unknown_tracker_is_a_choice_error(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    rc = lora.main(options("--data", str(data), "--adapter-path", str(tmp_path / "a"), "--report-to", "wandb"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "invalid choice: 'wandb'" in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="unknown tracker 'wandb'"):
        train_tiny(tmp_path / "b", 2, report_to=("wandb",))
    assert not (tmp_path / "b").exists()


def shim(folder, package):
    """A PYTHONPATH entry where `package` fails to import, as when it is not installed."""
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(f"raise ImportError({f'No module named {package!r}'!r})\n")
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def test_report_to_without_tensorboard_is_one_line_and_writes_nothing(tmp_path):
    data = write_data(tmp_path / "data")
    done = subprocess.run(COMMAND + options("--data", str(data), "--adapter-path", str(tmp_path / "a"), "--report-to",
                              "tensorboard"), capture_output=True, text=True, timeout=300,
                          env=shim(tmp_path / "shim", "tensorboard"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines == ['error: tensorboard is needed for --report-to tensorboard: '
                                              'pip install "mlx-paligemma[tracking]"'], done.stderr
    assert "Iter" not in done.stdout and not (tmp_path / "a").exists()


def test_without_matplotlib_the_plot_is_skipped_in_one_line(tmp_path):
    data = write_data(tmp_path / "data")
    done = subprocess.run(COMMAND + options("--data", str(data), "--adapter-path", str(tmp_path / "a"), "--iters", "2"),
                          capture_output=True, text=True, timeout=300, env=shim(tmp_path / "shim", "matplotlib"))
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stdout.splitlines() if "urves" in line]
    assert skipped == [f'Curves not plotted: no matplotlib (pip install "mlx-paligemma[report]"); the log is '
                       f'{tmp_path / "a" / LOG_FILE}']
    assert len(read_log(tmp_path / "a" / LOG_FILE)) == 3 and not (tmp_path / "a" / PLOT_FILE).exists()


@pytest.mark.parametrize("name", [LOG_FILE, PLOT_FILE, f"{TENSORBOARD_DIR}/events.out.tfevents.1.theirs"])
def test_someones_file_where_the_log_goes_is_refused(tmp_path, capsys, name):
    data = write_data(tmp_path / "data")
    theirs = tmp_path / "a" / name
    theirs.parent.mkdir(parents=True)
    theirs.write_text("my own notes\n")
    rc = lora.main(options("--data", str(data), "--adapter-path", str(tmp_path / "a")))
    lines = capsys.readouterr().err.strip().splitlines()
    a = tmp_path / "a"
    what = (f"{a / TENSORBOARD_DIR} holds {name.split('/')[1]!r}, which no training run wrote" if "/" in name else
            f"{a / name} was not written by a training run")
    assert rc == 1 and lines == [f"error: --adapter-path {a}: {what}; move it away"], lines
    assert theirs.read_text() == "my own notes\n"
    assert sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*")) == sorted(
        {name, name.split("/")[0]})


def test_reading_a_damaged_log(tmp_path):
    entry = json.dumps({"iteration": 1, "val_loss": 2.5})
    (tmp_path / "killed.jsonl").write_text(entry + "\n" + '{"iteration": 2, "train_lo')  # killed mid-line
    assert read_log(tmp_path / "killed.jsonl") == [{"iteration": 1, "val_loss": 2.5}]
    for bad in ("not json", "[1, 2]", '{"iteration": "2"}', '{"step": 2}'):
        (tmp_path / "bad.jsonl").write_text(entry + "\n" + bad + "\n" + entry + "\n")
        with pytest.raises(InputError) as e:
            read_log(tmp_path / "bad.jsonl")
        assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl'}, line 2: not a training log entry"), bad


def test_resuming_over_a_damaged_log_stops_before_training(tmp_path):
    train_tiny(tmp_path, 3)
    (tmp_path / LOG_FILE).write_text("garbage\n")
    with pytest.raises(InputError, match=r"log.jsonl has changed since a training run wrote it; move it away"):
        train_tiny(tmp_path, 6, resume=True)
    assert (tmp_path / LOG_FILE).read_text() == "garbage\n"
    assert json.loads((tmp_path / trainer.STATE_FILE).read_text())["step"] == 3
