"""The one writer of every output the project writes, under formats.ownership's rule: whole or not at all, and only
over what it wrote.

- A file (`--output`, `--predictions`, `--draw`, adapters, checkpoints, curves) is written to `.NAME.partial-PID.ext`
  beside it and renamed over NAME at the end, and recorded in its folder's record: NAME may be new or a file of
  ours (a rerun replaces its own output), never someone's file, a folder or a link.
- A file that grows by appends (a training log) is recorded by how it begins after every write.
- A folder written whole is built in `.NAME.partial-PID` and moved into place at the end: a new folder (a model
  folder: convert, export, fuse), or, for a report, also an empty folder or an earlier one of ours (its manifest).
Before the work, `check_file_output` and `check_folder_output` refuse in one line what the write would refuse at the
end. What a writer leaves under a temporary name is removed by itself on an error, on Ctrl-C and on SIGTERM, and,
after SIGKILL, by the next writer of that name once the process is gone; a live writer's is refused.
"""

import hashlib
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from .ownership import (US, check_file, check_manifest_folder, clean_stale, fingerprint, growing, locked, manifest_text,
                        ours_now, partial_path, read_record, refusal, write_record)


def _exit_on_terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
    raise SystemExit(128 + signal.SIGTERM)


@contextmanager
def terminations_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM unwinds it (SystemExit, exit code 143) as Ctrl-C does, instead of killing the
    process where it stands, so the block removes its temporaries. Only where SIGTERM has its default meaning and
    in the main thread: a program with its own handler (the server) keeps it."""
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _exit_on_terminate)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _probe(target: Path, failure: str) -> None:
    """A real write beside `target`, under its temporary name, removed at once (root passes os.access on read-only
    file systems, and /proc takes no new files); `failure: why` when it fails."""
    probe = partial_path(target)
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{failure}: {e.strerror or e}") from None


# --- files ---

def check_file_output(path: Path, what: str, writer: str = US) -> None:
    """Before the work, for a file written at its end: nothing there, or a file of ours (not a link, a folder or
    someone's file); its folder takes a new file; what a dead run left while writing it is removed."""
    path = Path(path)
    check_file(path, what, writer)
    clean_stale(path)
    _probe(path, f"{what} {path}: cannot write there")


@contextmanager
def atomic_file(path: Path, what: str = "", writer: str = US) -> Iterator[Path]:
    """A temporary file name beside `path` (same extension) to write; at the end of the block it replaces `path`
    if that is nothing or a file of ours (checked again: something may have appeared there during the work), and
    the folder's record says it is ours."""
    path = Path(path)
    check_file(path, what, writer)
    clean_stale(path)
    tmp = partial_path(path)
    with terminations_unwind():
        try:
            yield tmp
            _put(tmp, path, what, writer)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _put(tmp: Path, path: Path, what: str, writer: str) -> None:
    """Move the finished `tmp` over `path`. The record lists the new file before the move, beside the one it
    replaces, so a kill at any point leaves whichever is at `path` recorded as ours."""
    new = fingerprint(tmp)
    with locked(path.parent):
        record = read_record(path.parent)
        old, problem = ours_now(path, record, writer)
        if problem is not None:
            raise refusal(path, problem, what)
        record[path.name] = [fp for fp in (old, new) if fp is not None]
        write_record(path.parent, record)
        os.replace(tmp, path)


class GrowingFile:
    """A file of ours that grows by appends: it starts as `start` (replacing a file of ours, as atomic_file does),
    then each write is appended and flushed at once, and the record updated to how the file now begins, so a kill
    between a write and its record leaves a file that still begins as recorded."""

    def __init__(self, path: Path, start: str, what: str = "", writer: str = US):
        self.path = Path(path)
        data = start.encode("utf-8")
        with atomic_file(self.path, what, writer) as tmp:
            tmp.write_bytes(data)
        self.size, self.digest = len(data), hashlib.sha256(data)
        self._record()
        self.file = open(self.path, "ab")

    def _record(self) -> None:
        with locked(self.path.parent):
            record = read_record(self.path.parent)
            record[self.path.name] = [growing(self.size, self.digest.hexdigest())]
            write_record(self.path.parent, record)

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.file.write(data)
        self.file.flush()  # to the OS at once: a killed run keeps every line written
        self.size += len(data)
        self.digest.update(data)
        self._record()

    def close(self) -> None:
        self.file.close()


# --- folders ---

def check_new_folder(out: Path, probe: bool = False) -> None:
    """An output folder that is always a new one (a model folder): anything already there (a folder, a file, a link)
    is someone's and is refused, untouched. With `probe`, the folder it goes in is made and written to now, for
    commands that write it only at the end of their work."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        kind = "a folder" if out.is_dir() else "a file"
        raise InputError(f"output folder {out} already exists ({kind}): give a new path, or remove it first")
    if probe:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write {out}: {e.strerror or e}") from None
        _probe(out, f"cannot write {out}")


@contextmanager
def _building(out: Path, failure: str) -> Iterator[Path]:
    """A fresh `.NAME.partial-PID` folder beside `out`, with the umask's permissions, removed if the block fails;
    `failure: why` when it cannot be made."""
    clean_stale(out)
    tmp = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise InputError(f"{failure}: {e.strerror or e}") from None
    with terminations_unwind():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to write into, renamed to `out` (a new path) when the block succeeds and removed when it
    fails; made first, so an output that cannot be written fails before any work."""
    out = Path(out)
    check_new_folder(out)
    with _building(out, f"cannot write {out}") as tmp:
        yield tmp
        tmp.rename(out)


def _folder_of_ours(out: Path, manifest: str, what: str, writer: str) -> None:
    """Refuse what is at `out` unless it is nothing, an empty folder, or a folder of ours (its `manifest` lists
    everything in it, at every depth); never a link or a file."""
    if out.is_symlink():
        raise InputError(f"{what}: is a link, not a folder; give the folder itself, or a new path")
    if out.exists() and not out.is_dir():
        raise InputError(f"{what}: is a file, not a folder")
    if out.is_dir():
        try:
            entries = set(os.listdir(out))
        except OSError as e:
            raise InputError(f"{what}: cannot read the folder: {e.strerror}") from None
        if entries and manifest not in entries:
            raise InputError(f"{what}: the folder holds files and no earlier {writer}; give a new or empty folder")
        if entries:
            check_manifest_folder(out, manifest, what, writer)


def check_folder_output(out: Path, manifest: str, what: str, writer: str) -> None:
    """Before the work, for a folder written whole at its end (`what` names it in refusals): nothing there, an empty
    folder or a folder of ours (see _folder_of_ours). What a dead run left while writing it is removed, and where it
    goes takes a new folder."""
    out = Path(os.path.abspath(out))  # "." has a name and a parent
    _folder_of_ours(out, manifest, what, writer)
    clean_stale(out)
    parent = out.parent
    while not parent.exists():  # made when the folder is written
        parent = parent.parent
    _probe(parent / out.relative_to(parent).parts[0], f"{what}: cannot write there")


@contextmanager
def replaced_folder(out: Path, manifest: str, what: str, writer: str) -> Iterator[Path]:
    """A fresh folder to write into; when the block succeeds its manifest is written and it takes the place of
    `out` (see check_folder_output; checked again then), the folder it replaces moved aside first and removed
    after. A kill between the two moves leaves no folder at `out`; the next run removes both temporaries."""
    out = Path(os.path.abspath(out))
    check_folder_output(out, manifest, what, writer)
    with _building(out, f"{what}: cannot write there") as tmp:
        yield tmp
        (tmp / manifest).write_text(manifest_text(tmp, manifest))
        _folder_of_ours(out, manifest, what, writer)  # something may have appeared there during the work
        if not out.exists():
            os.replace(tmp, out)
            return
        old = partial_path(out, kind="old")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # the earlier one back where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
