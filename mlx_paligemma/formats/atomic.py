"""Writes that are whole or not at all, for every file and folder the project writes.

A file or folder is written under a temporary name beside it (`.NAME.partial-PID[.ext]`) and renamed into place when
complete, so a killed run never leaves a half-written output under the real name; what a dead run left is cleaned
up by the next, and a live writer's is refused. Output folders are always new: anything already at the path is
someone's and is left alone.
"""

import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import InputError


def _partial_parts(path: Path) -> tuple:
    stem, ext = (path.stem, path.suffix) if path.suffix else (path.name, "")
    return f".{stem}.partial-", ext


def partial_path(path: Path, pid: Optional[int] = None) -> Path:
    """Where `path` is written before it is renamed into place: `.NAME.partial-PID[.ext]` beside it."""
    path = Path(path)
    prefix, ext = _partial_parts(path)
    return path.parent / f"{prefix}{os.getpid() if pid is None else pid}{ext}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_stale(path: Path) -> None:
    """Remove what a killed run left while writing `path` (its process is gone); refuse while another live
    process is writing it."""
    path = Path(path)
    prefix, ext = _partial_parts(path)
    for stale in path.parent.glob(f"{prefix}*{ext}"):
        pid = stale.name[len(prefix):len(stale.name) - len(ext)]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _alive(int(pid)):
            raise InputError(f"{path} is being written by another process (pid {pid}): {stale} exists")
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def check_new_folder(out: Path, probe: bool = False) -> None:
    """An output folder is always a new one: anything already there (a folder, a file, a link) is someone's and is
    refused, untouched. With `probe`, the folder it goes in is made and written to now (a real write: root passes
    os.access on a read-only file system), for commands that write it only at the end of their work."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        kind = "a folder" if out.is_dir() else "a file"
        raise InputError(f"output folder {out} already exists ({kind}): give a new path, or remove it first")
    if probe:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            test = partial_path(out)
            test.write_bytes(b"")
            test.unlink()
        except OSError as e:
            raise InputError(f"cannot write {out}: {e.strerror or e}") from None


def check_writable(path: Path, what: str) -> None:
    """Before the work, for a file written at its end: not a folder or a device, and its folder takes a new file
    (a real write beside it, removed at once: root passes os.access on read-only file systems, and /proc takes no
    new files)."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise InputError(f"{what} {path}: exists and is not a regular file")
    probe = partial_path(path)
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write there: {e.strerror or e}") from None


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to write into, renamed to `out` when the block succeeds and removed when it fails; made
    first, so an output that cannot be written fails before any work. Normal permissions (the umask's)."""
    out = Path(out)
    check_new_folder(out)
    tmp = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp.mkdir()
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
    # A terminated run unwinds (SystemExit), so the partial folder is removed instead of left behind.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file name beside `path` (same extension), moved over `path` when the block succeeds."""
    path = Path(path)
    clean_stale(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
