"""The dataset runner's output (mlx_paligemma.batch): OUT and the part files beside it, and the rule for what a rerun
may touch.

OUT is always the answers to the first items of the input, written as whole lines, so a rerun skips what OUT holds
(a torn last line is cut off first) and appends the rest. OUT is only ever changed when it is the runner's own:
empty, or beginning with the line of the input's first item, decided from its first bytes before anything is cut or
appended. Under mlx.launch each rank appends its finished items to its own part file (`OUT.rankR.part`, lines
`INDEX<tab>LINE`), under the same rule; a rerun picks up part files as well as OUT.

A run remembers what it was asked (the model, the prompt, every setting) in `OUT.settings.json`, so that a rerun
with other settings is refused in one line naming the difference (or, with --overwrite, answers every item again)
instead of appending answers of two kinds to one file.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List

from .items import Item
from .records import ANSWER_KEYS, PREVIOUS_NAMES
from ..errors import InputError, read_json_object

SYNC_EVERY = 5.0  # seconds between fsyncs of the output: a crash of the machine loses at most this much work

# What the runner adds to an item's fields (data/records.py), and the previous release's name of the answer.
RESULT_KEYS = ANSWER_KEYS + ("error",) + tuple(PREVIOUS_NAMES)
WRITER = "mlx_paligemma.batch"  # who wrote a run's record
SAME_ITEM_KEYS = ("id", "image", "prompt", "prefix")  # what tells an item's line from another's


def line_of(item: Item, **result) -> str:
    # Written as UTF-8 (captions in other languages stay readable); lines are split on "\n" only, which
    # json.dumps always escapes, never on the other characters str.splitlines takes for line ends.
    return json.dumps({**item.fields, **result}, ensure_ascii=False)


def own_prefix(item: Item) -> bytes:
    """How every line this runner writes for `item` begins: its fields up to the first the result replaces."""
    fields = {}
    for key, value in item.fields.items():
        if key in RESULT_KEYS:
            break
        fields[key] = value
    return json.dumps(fields, ensure_ascii=False)[:-1].encode("utf-8")


def written_by_us(path: Path, item: Item, tag: bytes = b"") -> bool:
    """Whether `path` is a file this runner wrote, whose first line is `tag` + item's line: decided from its first
    bytes alone (an unrelated 5 GB file is not read), before anything in it is cut or appended to. A file shorter
    than that beginning (a first line torn by a kill) counts when it is a beginning of it."""
    expected = tag + own_prefix(item)
    with open(path, "rb") as f:
        head = f.read(len(expected))
    return expected.startswith(head)


def whole_lines(path: Path) -> List[str]:
    """The complete lines of a file; a last line without its newline was cut off by a kill and is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").split("\n")[:-1]


def cut_torn_tail(path: Path) -> None:
    """Cut a last line without its newline from a file of ours, so that appending starts on a fresh line."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        print(f"{path}: cut off a torn last line (its item will be redone)", file=sys.stderr)


def same_item(line: str, item: Item) -> bool:
    try:
        written = json.loads(line)
    except Exception:  # whatever a damaged line raises (RecursionError too): it is not the item's
        return False
    # Compared as JSON text, so that values that are not equal to themselves (NaN) still match.
    return isinstance(written, dict) and all(json.dumps(written.get(k)) == json.dumps(item.fields.get(k))
                                             for k in SAME_ITEM_KEYS)


def check_ours(out: Path, items: List[Item], source) -> None:
    if not written_by_us(out, items[0]):
        raise InputError(f"{out} exists and is not the output of this run (it does not begin with the line of "
                         f"item 1 of {source}): give a new --output, or remove it")


def items_in_output(out: Path, items: List[Item], source) -> int:
    """How many items OUT already answers: they are its lines, the first items of the input, in order. Everything
    is checked before OUT is touched; only then is a torn last line cut off."""
    if not out.exists():
        return 0
    check_ours(out, items, source)
    lines = whole_lines(out)
    if len(lines) > len(items):
        raise InputError(f"{out} has {len(lines)} lines but the input has {len(items)} items: is it the output "
                         "of another input? Give a new --output")
    for n, (line, item) in enumerate(zip(lines, items), 1):
        if not same_item(line, item):
            raise InputError(f"{out}, line {n} is not the output for item {n} of the input (id "
                             f"{json.dumps(item.fields.get('id'))}): its id, image or prompt differ. Is it the "
                             "output of another input or --prompt? Give a new --output")
    cut_torn_tail(out)
    return len(lines)


def start_over(out: Path) -> None:
    """--overwrite: OUT (ours: check_ours) emptied, for every item to be answered again."""
    if out.exists() and out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())


def place(path):
    """How a run's record names a local file or folder: by its absolute path, the same wherever the command runs
    from (a hub id, or a path not there, as given)."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def record_file(out: Path) -> Path:
    return out.with_name(f"{out.name}.settings.json")


def _recorded(path: Path) -> dict:
    """A run's record, or one line refusing a file of that name that is not one (it is never replaced)."""
    try:
        recorded = read_json_object(path)
    except InputError as e:
        raise InputError(f"{path} is not the record of a run ({e}): remove it, or give another --output") from None
    if recorded.get("written_by") != WRITER:
        raise InputError(f"{path} is not the record of a run of {WRITER}: remove it, or give another --output")
    return recorded


def check_same_run(out: Path, asked: dict) -> None:
    """Before OUT is touched: a rerun asks what the run that wrote OUT asked (its record), or is refused in one line
    naming each difference. An OUT without a record (an earlier release's) is resumed with a word."""
    path = record_file(out)
    recorded = _recorded(path) if path.exists() else None
    if not (out.exists() and out.stat().st_size):
        return
    if recorded is None:
        print(f"{out}: its settings were not recorded (an earlier release wrote it): resumed with this run's",
              file=sys.stderr)
        return
    differ = differences(recorded, asked)
    if differ:
        raise InputError(f"{out} holds answers to other settings ({', '.join(differ)}; {path.name}): rerun with "
                         "those to resume it, or add --overwrite to answer every item again")


def differences(recorded: dict, asked: dict) -> List[str]:
    """`name before -> now` of each thing `asked` that a run's record holds otherwise (its settings among them),
    compared as JSON, as they are written (a tuple of stop strings is the list read back)."""
    def flat(run: dict) -> dict:
        return {**run.get("settings", {}), **{k: v for k, v in run.items() if k != "settings"}}

    before = flat(recorded)
    return [f"{k} {json.dumps(before.get(k))} -> {json.dumps(v)}" for k, v in flat(asked).items()
            if json.dumps(before.get(k)) != json.dumps(v)]


def record_run(out: Path, asked: dict) -> None:
    """What this run was asked, beside OUT, written whole (after check_same_run)."""
    path = record_file(out)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"written_by": WRITER, **asked}, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def part_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.part")


def part_files(out: Path, items: List[Item]) -> List[Path]:
    """This run's part files beside OUT: a file of that name that this runner did not write is left alone."""
    return [p for p in sorted(out.parent.glob(f"{out.name}.rank*.part")) if is_our_part(p, items)]


def is_our_part(path: Path, items: List[Item]) -> bool:
    """A part file's lines are `INDEX<tab>LINE`: it is ours when empty or when its first line is the line of the
    item it names."""
    if not path.is_file():  # a folder or a FIFO is nobody's part file (and opening a FIFO would block)
        return False
    with open(path, "rb") as f:
        index = f.read(24).split(b"\t")[0]
    if not index:
        return True
    return index.isdigit() and int(index) < len(items) and written_by_us(path, items[int(index)], index + b"\t")


def items_in_parts(out: Path, items: List[Item], wanted: Iterable[int]) -> Dict[int, str]:
    """Lines of the wanted items found in this machine's part files, by item index. Any part file counts, so a
    rerun with another number of processes still finds the work of the last one."""
    wanted, found = set(wanted), {}
    for path in part_files(out, items):
        for line in whole_lines(path):  # each rank repairs its own file when it opens it
            index, _, text = line.partition("\t")
            if index.isdigit() and int(index) in wanted and same_item(text, items[int(index)]):
                found.setdefault(int(index), text)
    return found


class AppendFile:
    """A file that grows by whole lines: one write and a flush per line, so a kill leaves at most one torn line
    (cut off on resume); an fsync every SYNC_EVERY seconds and at the end, against a crash of the machine."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")
        self.synced = time.monotonic()

    def write(self, line: str) -> None:
        self.file.write(line)
        self.file.flush()
        if time.monotonic() - self.synced > SYNC_EVERY:
            os.fsync(self.file.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class OrderedOutput(AppendFile):
    """OUT, in input order: an item that finishes early waits until those before it are written."""

    def __init__(self, path: Path, next_index: int):
        super().__init__(path)
        self.next = next_index
        self.waiting: Dict[int, str] = {}

    def add(self, index: int, line: str) -> None:
        self.waiting[index] = line
        while self.next in self.waiting:
            self.write(self.waiting.pop(self.next) + "\n")
            self.next += 1


class PartOutput(AppendFile):
    """This rank's part file: lines as items finish, each prefixed with its item index."""

    def __init__(self, path: Path, items: List[Item]):
        if path.exists():
            if not is_our_part(path, items):
                raise InputError(f"{path} exists and is not a part file of this run: remove it, or give another "
                                 "--output")
            cut_torn_tail(path)
        super().__init__(path)

    def add(self, index: int, line: str) -> None:
        self.write(f"{index}\t{line}\n")
