"""One ownership rule for every writer (formats.ownership): a report folder, the TensorBoard folder and the files of a
training run are touched only where they are ours, at every depth; anything else there is refused in one line before
any work, and left byte-identical."""

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FIXTURES
from mlx_paligemma import lora
from mlx_paligemma.errors import InputError
from mlx_paligemma.formats.ownership import MARK_SUFFIX, first_foreign, is_partial
from mlx_paligemma.tasks import report
from mlx_paligemma.training.log import PLOT_FILE, TENSORBOARD_DIR
from test_training_log import train_tiny, write_data

IMAGES = FIXTURES / "images"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def caption_report(folder: Path, label: str = "cat", answer: str = "a cat") -> Path:
    """A report of one detection and one caption, written without a model."""
    image = str(IMAGES / "chelsea.jpg")
    box = {"label": label, "box": [10.0, 20.0, 200.0, 300.0], "score": 0.9}
    results = {"model": "m", "metric": "mean", "score": 0.5,
               "tasks": {"detect": {"questions": 1, "map": 0.5, "per_class_ap": {label: 0.5}},
                         "caption": {"questions": 1, "cider": 0.5}}}
    records = [{"task": "detect", "image": image, "prefix": f"detect {label}", "text": answer,
                "references": [answer], "score": 0.5, "objects": [box], "reference_objects": [{**box, "score": None}]},
               {"task": "caption", "image": image, "prefix": "caption en", "text": answer,
                "references": [answer], "score": 0.5}]
    return report.write_report(folder, results, records, [SimpleNamespace(source=image, image=image)])


def test_a_file_someone_put_in_a_report_subfolder_is_refused_and_kept(tmp_path):
    caption_report(tmp_path / "r")
    assert (tmp_path / "r" / "images").is_dir()
    caption_report(tmp_path / "r")  # a report written over its own earlier one
    (tmp_path / "r" / "images" / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path / "r")
    with pytest.raises(InputError) as e:
        report.check_folder(tmp_path / "r")
    assert str(e.value) == f"--report {tmp_path / 'r'}: holds 'images/notes.txt', which no report wrote; give a new " \
                           "or empty folder"
    with pytest.raises(InputError):
        caption_report(tmp_path / "r")
    assert snapshot(tmp_path / "r") == before
    # A folder someone made inside the report is not ours either, even empty.
    (tmp_path / "r" / "images" / "notes.txt").unlink()
    (tmp_path / "r" / "images" / "mine").mkdir()
    with pytest.raises(InputError, match="holds 'images/mine', which no report wrote"):
        report.check_folder(tmp_path / "r")


def test_the_manifest_lists_every_file_and_folder(tmp_path):
    caption_report(tmp_path / "r")
    listed = set((tmp_path / "r" / report.MARKER).read_text().splitlines())
    on_disk = {str(p.relative_to(tmp_path / "r")) + ("/" if p.is_dir() else "")
               for p in (tmp_path / "r").rglob("*")} - {report.MARKER}
    assert listed == on_disk and "images/" in listed and "index.html" in listed


@pytest.mark.parametrize("label", ["$\\undefinedmacro{$", "$x^2$", "a_b ^c $", "\\"])
def test_labels_are_text_in_the_plots(tmp_path, label):
    """matplotlib reads `$...$` as math: a class name like this once crashed the report after the evaluation."""
    page = caption_report(tmp_path / "r", label=label, answer=f"<loc0001> {label}").read_text()
    assert (tmp_path / "r" / "pr-detect.png").stat().st_size > 0
    assert "undefinedmacro" not in label or "\\undefinedmacro{$" in page


def test_partial_names_are_ours_and_others_are_not():
    assert is_partial(".adapters.partial-123.safetensors") and is_partial(".log.partial-7.jsonl")
    assert not is_partial("adapters.partial-123.safetensors") and not is_partial(".notes.txt")


def test_first_foreign_walks_every_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x").write_text("")
    assert first_foreign(tmp_path, lambda p, d: d) == "a/b/x"
    assert first_foreign(tmp_path, lambda p, d: True) is None


def events(folder: Path) -> list:
    return sorted(p.name for p in (folder / TENSORBOARD_DIR).iterdir())


def test_resume_without_tensorboard_keeps_the_event_files_of_the_first_run(tmp_path):
    pytest.importorskip("tensorboard")
    train_tiny(tmp_path, 3, report_to=("tensorboard",))
    first = events(tmp_path)
    assert len(first) == 1 and first[0].endswith(MARK_SUFFIX)
    before = snapshot(tmp_path / TENSORBOARD_DIR)
    train_tiny(tmp_path, 4, resume=True)
    assert snapshot(tmp_path / TENSORBOARD_DIR) == before


def test_overwrite_replaces_only_our_event_files_and_refuses_others(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    train_tiny(tmp_path, 2, report_to=("tensorboard",))
    ours = events(tmp_path)
    theirs = tmp_path / TENSORBOARD_DIR / "events.out.tfevents.1.otherhost.theirs"
    theirs.write_bytes(b"someone else's run")
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as e:
        train_tiny(tmp_path, 2, overwrite=True, report_to=("tensorboard",))
    assert str(e.value) == (f"--adapter-path {tmp_path}: {tmp_path / TENSORBOARD_DIR} holds "
                            "'events.out.tfevents.1.otherhost.theirs', which no training run wrote; move it away")
    assert snapshot(tmp_path) == before
    theirs.unlink()
    train_tiny(tmp_path, 2, overwrite=True, report_to=("tensorboard",))
    assert len(events(tmp_path)) == 1 and events(tmp_path) != ours


@pytest.mark.parametrize("name, kind, made", [(TENSORBOARD_DIR, "a file", "file"), (PLOT_FILE, "a folder", "dir"),
                                               ("adapters.safetensors", "a folder", "dir"),
                                               ("best", "a file", "file"),
                                               ("log.jsonl", "a FIFO, device or socket", "fifo")])
def test_overwrite_over_a_name_of_the_wrong_kind_is_one_line_before_training(tmp_path, capsys, name, kind, made):
    data = write_data(tmp_path / "data")
    adapters = tmp_path / "a"
    adapters.mkdir()
    if made == "dir":
        (adapters / name).mkdir()
        (adapters / name / "inside.txt").write_text("mine\n")
    elif made == "fifo":
        os.mkfifo(adapters / name)  # reading it would block
    else:
        (adapters / name).write_text("mine\n")
    before = snapshot(adapters)
    rc = lora.main(["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data), "--adapter-path",
                    str(adapters), "--iters", "1", "--batch-size", "2", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    what = "folder" if name in (TENSORBOARD_DIR, "best") else "file"
    assert rc == 1 and err == [f"error: --adapter-path {adapters}: {adapters / name} is {kind}, not a {what} a "
                               "training run wrote; move it away"]
    assert snapshot(adapters) == before


def test_best_holding_someones_file_is_refused(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "README.md").write_text("mine\n")
    with pytest.raises(InputError, match=r"best holds 'README.md', which no training run wrote"):
        train_tiny(tmp_path, 1, overwrite=True)
    assert json.dumps(snapshot(tmp_path)) and (tmp_path / "best" / "README.md").read_text() == "mine\n"
