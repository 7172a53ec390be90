"""The one rule of every writer: it creates, changes or deletes only what it wrote, at every depth, and anything
else where it writes is refused in one line before any work. It never writes through a link, nor replaces one.

What a writer wrote is known in one of four ways:
- a record: a folder where we write files beside others' (the folder of `--output notes.json`, ADAPTER_PATH) holds
  RECORD, which lists each file we wrote there as we left it: its size and modification time, or, for a file that
  grows by appends (a training log), the hash of how it begins. A file under such a name that is not as we left it
  (edited, replaced, or a copy made without its times) is not ours;
- a manifest: a folder that is wholly one writer's (an evaluation report) holds a file listing every path written
  there, folders with a trailing `/`; a path not listed (a note someone saved in `report/images/`) is not ours;
- names: in a folder of ours that another library writes (TensorBoard's), entries whose names end in MARK_SUFFIX;
- content: the dataset runner's OUT begins with its own line for the input's first item (data.outputs).
What a run of ours left under a temporary name (`.NAME.partial-PID[.ext]`, `.NAME.old-PID[.ext]`) is ours too: the
next writer of NAME removes it once that process is gone.
"""

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import InputError

MARK_SUFFIX = ".mlx-paligemma"  # ends the names of files whose format leaves no room for a marker inside
RECORD = ".mlx-paligemma-written"  # in each folder where we write files: what we wrote there, as we left it
RECORD_BYTES = 1 << 24  # a record of thousands of files is a few hundred kB
US = "mlx-paligemma"  # the writer named in refusals when no narrower one is
_TEMPORARY = re.compile(r"^\..+\.(partial|old)-\d+(\.[^.]+)?$")


# --- temporary names ---

def temporary_parts(path: Path, kind: str = "partial") -> Tuple[str, str]:
    """(`.STEM.KIND-`, `.EXT`): what a temporary name of `path` has before and after the writer's process id."""
    stem, ext = (path.stem, path.suffix) if path.suffix else (path.name, "")
    return f".{stem}.{kind}-", ext


def partial_path(path: Path, pid: Optional[int] = None, kind: str = "partial") -> Path:
    """Where `path` is written before it is renamed into place: `.NAME.partial-PID[.ext]` beside it (`old`: where
    the folder it replaces waits while the new one is moved in)."""
    path = Path(path)
    prefix, ext = temporary_parts(path, kind)
    return path.parent / f"{prefix}{os.getpid() if pid is None else pid}{ext}"


def is_partial(name: str) -> bool:
    """A temporary name of formats.atomic's: a file or folder being written, or a folder being replaced."""
    return bool(_TEMPORARY.match(name))


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
    for kind in ("partial", "old"):
        prefix, ext = temporary_parts(path, kind)
        for stale in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(ext)}"):  # a name may hold [ or *
            pid = stale.name[len(prefix):len(stale.name) - len(ext)]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            if _alive(int(pid)):
                raise InputError(f"{path} is being written by another process (pid {pid}): {stale} exists")
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


# --- walking a folder ---

def walk(root: Path) -> Iterator[Tuple[str, bool]]:
    """Every path under `root` as (relative path with `/`, is a folder), sorted, at every depth; links are not
    followed (a link is an entry like a file)."""
    def visit(folder: Path, prefix: str):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise InputError(f"cannot read {folder}: {e.strerror or e}") from None
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            yield prefix + entry.name, is_dir
            if is_dir:
                yield from visit(Path(entry.path), prefix + entry.name + "/")
    yield from visit(Path(root), "")


def first_foreign(root: Path, ours: Callable[[str, bool], bool]) -> Optional[str]:
    """The first path under `root` that `ours(relative path, is a folder)` does not claim, or None."""
    for path, is_dir in walk(root):
        if not ours(path, is_dir) and not is_partial(path.rsplit("/", 1)[-1]):
            return path
    return None


def kind_of(path: Path) -> str:
    if path.is_symlink():
        return "a link"
    if path.is_dir():
        return "a folder"
    return "a file" if path.is_file() else "a FIFO, device or socket"


# --- the record of the files we wrote in a folder ---

def read_record(folder: Path) -> Dict[str, List[list]]:
    """{name: [fingerprint, ...]} of what we wrote in `folder` ({} when it has no record). A RECORD we did not
    write (a link, a folder, anything that is not a record) is refused: nothing there can be told to be ours."""
    path = Path(folder) / RECORD
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    problem = None if stat.S_ISREG(mode) else f"is {kind_of(path)}"
    if problem is None:
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read(RECORD_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not all(isinstance(v, list) and all(isinstance(f, list) for f in v)
                                                   for v in record.values()):
            problem = "is not a record this package wrote"
    if problem is not None:
        raise InputError(f"{path} {problem}, where {US} keeps the list of the files it wrote in {folder}; move it "
                         "away")
    return record


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """The folder locked against the other writers of its record (a lock on the folder itself: no lock file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise InputError(f"cannot write in {folder}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: the record is still replaced whole
        yield
    finally:
        os.close(fd)  # releases the lock


def write_record(folder: Path, record: Dict[str, List[list]]) -> None:
    """Replace the record whole (under `locked(folder)`)."""
    path = Path(folder) / RECORD
    clean_stale(path)
    tmp = partial_path(path)
    try:
        lines = [f"{json.dumps(name)}: {json.dumps(record[name])}" for name in sorted(record)]  # a file a line
        tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fingerprint(path: Path) -> list:
    """How a file replaced whole is recorded: its size and modification time (kept by renames and by copies that
    keep times: cp -p, rsync -a, shutil.copytree)."""
    st = os.stat(path)
    return ["file", st.st_size, st.st_mtime_ns]


def growing(size: int, digest: str) -> list:
    """How a file that grows by appends is recorded: it begins with `size` bytes of this sha256."""
    return ["begins", size, digest]


def _matches(path: Path, fingerprints: List[list]) -> Optional[list]:
    st = os.stat(path)
    for fp in fingerprints:
        if fp[:1] == ["file"] and fp[1:] == [st.st_size, st.st_mtime_ns]:
            return fp
        if fp[:1] == ["begins"] and len(fp) == 3 and isinstance(fp[1], int) and 0 <= fp[1] <= st.st_size:
            digest, left = hashlib.sha256(), fp[1]
            with open(path, "rb") as f:
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    left -= len(chunk)
            if not left and digest.hexdigest() == fp[2]:
                return fp
    return None


def ours_now(path: Path, record: Dict[str, List[list]], writer: str = US) -> Tuple[Optional[list], Optional[str]]:
    """(its fingerprint, None) for a file of ours at `path`; (None, None) for nothing there; (None, why not) for
    anything else: a link, a folder, a file not in the record or no longer as we left it."""
    if not (path.exists() or path.is_symlink()):
        return None, None
    if path.is_symlink() or not path.is_file():
        return None, f"is {kind_of(path)}, not a file {writer} wrote"
    fingerprints = record.get(path.name)
    if fingerprints is None:
        return None, f"was not written by {writer}"
    matched = _matches(path, fingerprints)
    return (matched, None) if matched is not None else (None, f"has changed since {writer} wrote it")


ADVICE = "remove it, or give another path"


def refusal(path: Path, problem: str, what: str = "", advice: str = ADVICE) -> InputError:
    """The one line refusing to write over `path` (`what`: the option that named it)."""
    return InputError(f"{what} {path}: {problem}; {advice}" if what else f"{path} {problem}; {advice}")


def check_file(path: Path, what: str = "", writer: str = US) -> None:
    """Refuse, in one line, what is at `path` unless it is nothing or a file of ours."""
    path = Path(path)
    if path.name == RECORD:
        raise refusal(path, f"is the name of the record {US} keeps in each folder it writes in", what,
                      "give another path")
    _, problem = ours_now(path, read_record(path.parent) if path.parent.is_dir() else {}, writer)
    if problem is not None:
        raise refusal(path, problem, what)


# --- a folder wholly one writer's, with a manifest ---

def read_manifest(folder: Path, name: str) -> set:
    """The paths a manifest lists (empty when it is missing or not a file: then nothing there is ours)."""
    manifest = Path(folder) / name
    if not manifest.is_file() or manifest.is_symlink():
        return set()
    try:
        with open(manifest, "rb") as f:
            text = f.read(RECORD_BYTES).decode("utf-8", errors="replace")  # a real manifest is a few kB
    except OSError:
        return set()
    return set(text.splitlines())


def manifest_text(folder: Path, name: str) -> str:
    """The manifest of everything now under `folder` (written last, when the folder is complete)."""
    return "".join(f"{path}/\n" if is_dir else f"{path}\n" for path, is_dir in walk(folder) if path != name)


def check_manifest_folder(folder: Path, name: str, what: str, writer: str) -> None:
    """Refuse a folder holding anything, at any depth, that its manifest does not list."""
    listed = read_manifest(folder, name)
    foreign = first_foreign(folder, lambda path, is_dir: path == name or (path + "/" if is_dir else path) in listed)
    if foreign is not None:
        raise InputError(f"{what}: holds {foreign!r}, which no {writer} wrote; give a new or empty folder")


# --- fixed names in a shared folder ---

FILE = "file"  # a file of ours, by the folder's record
RECORDED = "recorded"  # a folder of ours holding only files of ours, by its own record


def check_names(folder: Path, names: Dict[str, object], what: str, writer: str) -> None:
    """Refuse what sits under our names in a shared `folder` and is not ours: `names` maps each name to FILE, to
    RECORDED, or to a predicate on the entry names a folder of ours holds (every entry, at every depth, must pass
    it: names that mark it ours). Other names in `folder` are not looked at: they are someone else's and left
    alone."""
    folder, one = Path(folder), f"a {writer}"
    record = read_record(folder) if folder.is_dir() else {}
    for name, kind in names.items():
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if kind == FILE:
            _, problem = ours_now(path, record, one)
            if problem is not None:
                raise InputError(f"{what}: {path} {problem}; move it away")
            continue
        if path.is_symlink() or not path.is_dir():
            raise InputError(f"{what}: {path} is {kind_of(path)}, not a folder {one} wrote; move it away")
        foreign = first_foreign(path, _claims(path, kind))
        if foreign is not None:
            raise InputError(f"{what}: {path} holds {foreign!r}, which no {writer} wrote; move it away")


def _claims(folder: Path, kind) -> Callable[[str, bool], bool]:
    """What a folder of ours claims as its entries: for RECORDED, its record and the files it lists as we left
    them; else the files directly in it whose names pass `kind`."""
    if kind == RECORDED:
        record = read_record(folder)
        return lambda entry, is_dir: entry == RECORD or ours_now(folder / entry, record)[0] is not None
    return lambda entry, is_dir: not is_dir and "/" not in entry and kind(entry)
