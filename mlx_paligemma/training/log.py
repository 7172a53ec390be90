"""The record of a training run beside its adapters: the reports of mlx_paligemma.training.trainer.train (the dicts it
returns as history) as JSON lines in ADAPTER_PATH/log.jsonl, the same scalars as TensorBoard event files in
ADAPTER_PATH/tensorboard (--report-to tensorboard), and a plot of the curves in ADAPTER_PATH/curves.png.

The log is the record: each line is flushed as it is written, so a killed run keeps what it reported, and a resumed
run first drops what came after its checkpoint's step, so every step is in the log once and in order. The event
files are written from the log (replayed on resume), never the other way round. The log and the plot are files of
ours by the folder's record (formats.atomic), the event files by their names.
"""

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from ..formats.atomic import GrowingFile, atomic_file
from ..formats.ownership import FILE, MARK_SUFFIX
from ..errors import InputError, cause
from ..extras import install_line, require

LOG_FILE, PLOT_FILE, TENSORBOARD_DIR = "log.jsonl", "curves.png", "tensorboard"
EVENTS = "events.out.tfevents."  # how TensorBoard names event files; ours also end in MARK_SUFFIX


def ours(name: str) -> bool:
    """An event file this package wrote (TensorBoard reads any name holding `tfevents`)."""
    return name.startswith(EVENTS) and name.endswith(MARK_SUFFIX)


# What a run owns in ADAPTER_PATH, for formats.ownership.check_names.
OWNED = {LOG_FILE: FILE, PLOT_FILE: FILE, TENSORBOARD_DIR: ours}
TRACKERS = ("tensorboard",)
# The history keys of a train report and the scalar names they go by in TensorBoard.
TRAIN_SCALARS = {"train_loss": "train/loss", "learning_rate": "train/learning_rate",
                 "steps_per_second": "train/steps_per_second", "tokens_per_second": "train/tokens_per_second",
                 "peak_memory": "train/peak_memory_gb"}


def scalars(entry: dict) -> Dict[str, float]:
    """A history entry's numbers by TensorBoard tag: train/..., val/loss, val/<the task's metric>."""
    if "train_loss" in entry:
        return {tag: entry[key] for key, tag in TRAIN_SCALARS.items() if key in entry}
    if "val_loss" in entry:
        return {"val/loss": entry["val_loss"]}
    if "val_metrics" in entry:
        return {f"val/{entry['val_metrics']['metric']}": entry["val_metrics"]["score"]}
    return {}


def check_trackers(names: Sequence[str]) -> None:
    """Before any work: each --report-to tracker is known and its library imports."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise InputError(f"unknown tracker {unknown[0]!r} for --report-to: choose from {', '.join(TRACKERS)}")
    if "tensorboard" in names:
        require("tracking", "--report-to tensorboard")


def read_log(file: Path) -> List[dict]:
    """The entries of a log. A last line without its newline is one a killed run was writing: it is dropped."""
    try:
        text = Path(file).read_text()
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or cause(e)}") from None
    lines = text.split("\n")
    entries = []
    for number, line in enumerate(lines[:-1], 1):  # the piece after the last newline is partial or empty
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("iteration"), int):
            raise InputError(f"{file}, line {number}: not a training log entry; move the file away, or give "
                             "--overwrite to start a new log")
        entries.append(entry)
    return entries


class TrainingLog:
    """Opened when a run starts at `start` (0, or the step it resumes from): the log keeps what came up to that
    step and goes on from there; the event files are rewritten from it."""

    def __init__(self, folder, start: int, report_to: Sequence[str] = ()):
        self.folder, self.file, self.report_to, self.start = Path(folder), Path(folder) / LOG_FILE, report_to, start
        # Read (and a damaged log refused) now, before the first step; written at the first entry.
        self.kept = [e for e in read_log(self.file) if e["iteration"] <= start] if start and self.file.exists() else []
        self.out = self.writer = None

    def _open(self) -> None:
        """At the first entry, not before: under mlx.launch every entry follows a collective step, so by then each
        process has checked the adapter folder, and none finds this run's own log there and refuses it."""
        self.out = GrowingFile(self.file, "".join(json.dumps(e) + "\n" for e in self.kept))
        events = self.folder / TENSORBOARD_DIR
        # Our event files are rewritten from the log (up to `start`) when this run reports to TensorBoard, and
        # dropped with the rest of a run that a new one replaces; a resumed run that does not report to TensorBoard
        # leaves them as they are. Files of other tools are never touched (refused before the run when present).
        if "tensorboard" in self.report_to or not self.start:
            for stale in (events.iterdir() if events.is_dir() else ()):
                if ours(stale.name):
                    stale.unlink()
        if "tensorboard" in self.report_to:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.writer = EventFileWriter(str(events), filename_suffix=MARK_SUFFIX)
            for entry in self.kept:
                self._event(entry)

    def _event(self, entry: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(entry).items()]
        self.writer.add_event(Event(wall_time=time.time(), step=entry["iteration"], summary=Summary(value=values)))

    def write(self, entry: dict) -> None:
        if self.out is None:
            self._open()
        self.out.write(json.dumps(entry) + "\n")  # flushed at once: a killed run keeps every line written
        if self.writer is not None:
            self._event(entry)
            self.writer.flush()

    def close(self, report: Callable[[str], None] = print) -> None:
        """Close the files and plot the curves (skipped, in one line, without matplotlib)."""
        if self.out is None:
            return
        self.out.close()
        if self.writer is not None:
            self.writer.close()
        plot_run(self.folder, report)


def plot_run(folder, report: Callable[[str], None] = print) -> None:
    """The curves of folder/log.jsonl to folder/curves.png, or one line saying why not."""
    folder = Path(folder)
    entries = read_log(folder / LOG_FILE) if (folder / LOG_FILE).is_file() else []
    if not entries:
        return
    try:
        plot_curves(entries, folder / PLOT_FILE)
    except ImportError:
        report(f"Curves not plotted: no matplotlib ({install_line('report')}); the log is {folder / LOG_FILE}")
        return
    report(f"Plotted the curves to {folder / PLOT_FILE}")


def plot_curves(entries: Sequence[dict], file: Path) -> None:
    """Train and validation loss, learning rate and, when the run scored its validation set, the task's metric
    against the step, as a PNG. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: the process's backend is left alone
    from matplotlib.figure import Figure

    def series(key, pick=lambda value: value):
        points = [(e["iteration"], pick(e[key])) for e in entries if key in e]
        return [step for step, _ in points], [value for _, value in points]

    metrics = [e["val_metrics"] for e in entries if "val_metrics" in e]
    panels = 3 if metrics else 2
    figure = Figure(figsize=(6, 2.4 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    loss, lr, *rest = figure.subplots(panels, 1, sharex=True)
    loss.plot(*series("train_loss"), label="train")
    loss.plot(*series("val_loss"), "o-", label="validation")
    loss.set_ylabel("loss")
    loss.legend()
    lr.plot(*series("learning_rate"))
    lr.set_ylabel("learning rate")
    if metrics:
        rest[0].plot(*series("val_metrics", lambda results: results["score"]), "o-")
        rest[0].set_ylabel(metrics[-1]["metric"])
    figure.axes[-1].set_xlabel("step")
    with atomic_file(file) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
