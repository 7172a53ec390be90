"""The one rule of every writer: it creates, changes or deletes only what it wrote, at every depth, and anything
else where it writes is refused in one line before any work.

What a writer wrote is known in one of two ways:
- a manifest: a folder that is wholly one writer's (an evaluation report) holds a file listing every path written
  there, folders with a trailing `/`; a path not listed (a note someone saved in `report/images/`) is not ours;
- names and kinds: in a folder shared with others (ADAPTER_PATH), the writer owns fixed names of a fixed kind (a
  file, or a folder whose every entry has a name it gives, such as TensorBoard event files ending in MARK_SUFFIX).
What a killed run of ours left under a temporary name (formats.atomic's `.NAME.partial-PID[.ext]`) is ours too.
"""

import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Set, Tuple

from ..errors import InputError

MARK_SUFFIX = ".mlx-paligemma"  # ends the names of files whose format leaves no room for a marker inside
_PARTIAL = re.compile(r"^\..+\.partial-\d+(\.[^.]+)?$")


def is_partial(name: str) -> bool:
    """A name formats.atomic writes under before renaming into place."""
    return bool(_PARTIAL.match(name))


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


# --- a folder wholly one writer's, with a manifest ---

def read_manifest(folder: Path, name: str) -> Set[str]:
    """The paths a manifest lists (empty when it is missing or not a file: then nothing there is ours)."""
    manifest = Path(folder) / name
    if not manifest.is_file() or manifest.is_symlink():
        return set()
    try:
        with open(manifest, "rb") as f:
            text = f.read(1 << 24).decode("utf-8", errors="replace")  # a real manifest is a few kB
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

FILE = "file"


def check_names(folder: Path, names: Dict[str, object], what: str, writer: str) -> None:
    """Refuse what sits under our names in a shared `folder` and is not ours: `names` maps each name to FILE (a
    regular file, replaced whole) or to a predicate on the entry names a folder of ours holds (every entry, at every
    depth, must pass it). Other names in `folder` are not looked at: they are someone else's and left alone."""
    folder = Path(folder)
    for name, kind in names.items():
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if kind == FILE:
            if not path.is_file():
                raise InputError(f"{what}: {path} is {_kind(path)}, not a file a {writer} wrote; move it away")
            continue
        if path.is_symlink() or not path.is_dir():
            raise InputError(f"{what}: {path} is {_kind(path)}, not a folder a {writer} wrote; move it away")
        foreign = first_foreign(path, lambda entry, is_dir: not is_dir and "/" not in entry and kind(entry))
        if foreign is not None:
            raise InputError(f"{what}: {path} holds {foreign!r}, which no {writer} wrote; move it away")


def _kind(path: Path) -> str:
    if path.is_symlink():
        return "a link"
    if path.is_dir():
        return "a folder"
    return "a file" if path.is_file() else "a FIFO, device or socket"
