"""Answer a prompt about every item of a JSONL file or a folder of images, into a JSONL file; resumable, and
split across processes or machines under `mlx.launch`.

    python -m mlx_paligemma.batch --model M --input items.jsonl --output answers.jsonl [--prompt "caption en"]
    python -m mlx_paligemma.batch --model M --input photos/ --output captions.jsonl --prompt "caption en"
    mlx.launch -n 2 --backend ring --python PY -- -m mlx_paligemma.batch --model M --input IN --output OUT

An input line is {"image": path or URL (or a list of them), "prompt": "...", "id": ...} plus any fields of your
own; `id` defaults to the line number, `prompt` to --prompt, paths are relative to the file. A folder gives every
image file in it and its subfolders, sorted by path. OUT gets one line per item in input order: the item's fields
(with its `id` and `prompt`) plus "answer" (and with --json "objects"), or "error" for an item that cannot be done.

OUT is always the answers to the first items of the input, written as whole lines, so a rerun of the same command
skips what OUT holds (a torn last line is cut off first) and appends the rest. Under mlx.launch the items are
dealt out round-robin to the ranks; each rank appends its finished items to its own part file beside OUT
(`OUT.rankR.part`, on its own machine) and at the end rank 0 gathers them through mx.distributed and appends them
to OUT in input order, so OUT is the same as one process writes. A rerun picks up part files as well as OUT.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import mlx.core as mx
import numpy as np

from .cli import ArgumentParser, run_main
from .detection import ObjectReader, objects_to_json
from .engine import Engine, check_generation_args
from .processor import InputError, cause, load_image

SYNC_EVERY = 5.0  # seconds between fsyncs of the output: a crash of the machine loses at most this much work
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (logs, mlx.launch)


@dataclass
class Item:
    fields: dict  # what OUT's line repeats: the input line's fields with its id and prompt
    images: List[str]  # absolute paths or URLs
    prompt: str
    error: Optional[str] = None  # set when the input line itself is bad


# Input.

def read_items(source: Path, prompt: Optional[str]) -> List[Item]:
    if source.is_dir():
        return folder_items(source, prompt)
    return jsonl_items(source, prompt)


def folder_items(folder: Path, prompt: str) -> List[Item]:
    from PIL import Image

    extensions = {e for e, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    # Names starting with a dot are skipped: macOS leaves ._NAME.jpg resource forks and .DS_Store beside images.
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in extensions and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [Item({"id": n, "image": name, "prompt": prompt}, [str(folder / name)], prompt)
            for n, name in enumerate(files, 1)]


def jsonl_items(file: Path, prompt: Optional[str]) -> List[Item]:
    """One item per non-blank line. A line that is not a usable item still is one, with an error, so that OUT has
    a line for it and the run goes on."""
    items = []
    for n, line in enumerate(file.read_bytes().decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            items.append(Item({"id": n}, [], "", f"not valid JSON: {e}"))
            continue
        if not isinstance(row, dict):
            items.append(Item({"id": n}, [], "", "not a JSON object"))
            continue
        fields = row if "id" in row else {"id": n, **row}
        images = row.get("image")
        images = [images] if isinstance(images, str) else images
        text = row.get("prompt", prompt)
        error = None
        if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
            error = "'image' must be a path or URL, or a list of them"
        elif not isinstance(text, str):
            error = "no prompt: give one in the line or with --prompt"
        else:
            fields = {**fields, "prompt": text}
            images = [i if i.startswith(("http://", "https://")) else str(file.parent / i) for i in images]
        items.append(Item(fields, images if error is None else [], text if error is None else "", error))
    return items


# Output: OUT, the part files, resuming.

def line_of(item: Item, **result) -> str:
    # Written as UTF-8 (captions in other languages stay readable); lines are split on "\n" only, which
    # json.dumps always escapes, never on the other characters str.splitlines takes for line ends.
    return json.dumps({**item.fields, **result}, ensure_ascii=False)


def whole_lines(path: Path, repair: bool) -> List[str]:
    """The complete lines of a file; a last line without its newline was cut off by a kill and is dropped (and
    with `repair`, cut from the file, so that appending starts on a fresh line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        print(f"{path}: cut off a torn last line (its item will be redone)", file=sys.stderr)
    return data[:end].decode("utf-8").split("\n")[:-1]


def same_item(line: str, item: Item) -> bool:
    try:
        written = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(written, dict) and all(written.get(k) == item.fields.get(k) for k in ("id", "image", "prompt"))


def items_in_output(out: Path, items: List[Item]) -> int:
    """How many items OUT already answers: they are its lines, the first items of the input, in order."""
    lines = whole_lines(out, repair=True)
    if len(lines) > len(items):
        raise InputError(f"{out} has {len(lines)} lines but the input has {len(items)} items: is it the output "
                         "of another input? Give a new --output")
    for n, (line, item) in enumerate(zip(lines, items), 1):
        if not same_item(line, item):
            raise InputError(f"{out}, line {n} is not the output for item {n} of the input (id "
                             f"{json.dumps(item.fields.get('id'))}): its id, image or prompt differ. Is it the "
                             "output of another input or --prompt? Give a new --output")
    return len(lines)


def part_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.part")


def part_files(out: Path) -> List[Path]:
    return sorted(out.parent.glob(f"{out.name}.rank*.part"))


def items_in_parts(out: Path, items: List[Item], wanted: Iterable[int]) -> Dict[int, str]:
    """Lines of the wanted items found in this machine's part files, by item index. Any part file counts, so a
    rerun with another number of processes still finds the work of the last one."""
    wanted, found = set(wanted), {}
    for path in part_files(out):
        for line in whole_lines(path, repair=False):  # each rank repairs its own file when it opens it
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

    def __init__(self, path: Path):
        whole_lines(path, repair=True)
        super().__init__(path)

    def add(self, index: int, line: str) -> None:
        self.write(f"{index}\t{line}\n")


# Several processes: the two exchanges, both through mx.distributed.

def broadcast_int(world, value: int) -> int:
    """Rank 0's value, on every rank."""
    return int(mx.distributed.all_sum(mx.array(value if world.rank() == 0 else 0), group=world, stream=mx.cpu).item())


def gather_lines(world, lines: Dict[int, str]) -> Dict[int, str]:
    """Every rank's {index: line}, on every rank: UTF-8 bytes, padded to the longest, gathered in one piece."""
    data = "".join(f"{i}\t{line}\n" for i, line in lines.items()).encode("utf-8")
    sizes = mx.distributed.all_gather(mx.array([len(data)]), group=world, stream=mx.cpu).tolist()
    padded = mx.array(np.frombuffer(data.ljust(max(sizes), b"\0"), np.uint8))
    everything = np.array(mx.distributed.all_gather(padded, group=world, stream=mx.cpu)).tobytes()
    out = {}
    for rank, size in enumerate(sizes):
        chunk = everything[rank * max(sizes):rank * max(sizes) + size].decode("utf-8")
        for line in chunk.split("\n")[:-1]:
            index, _, text = line.partition("\t")
            out[int(index)] = text
    return out


# Progress.

class Progress:
    """One line on stderr: redrawn in place on a terminal, printed every PROGRESS_EVERY seconds otherwise."""

    def __init__(self, total: int, done: int, label: str):
        self.total, self.done, self.label = total, done, label
        self.items = self.tokens = self.errors = 0
        self.tic = self.shown = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, items: int = 0, tokens: int = 0, errors: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        self.errors += errors
        self.done += items
        now = time.monotonic()
        if now - self.shown >= (0.25 if self.tty else PROGRESS_EVERY):
            self.shown = now
            self.show()

    def rates(self):
        elapsed = max(time.monotonic() - self.tic, 1e-9)
        return elapsed, self.items / elapsed, self.tokens / elapsed

    def show(self, end: str = "") -> None:
        elapsed, items_s, tokens_s = self.rates()
        left = (self.total - self.done) / items_s if items_s else None
        bar = ""
        if self.tty:
            filled = round(20 * self.done / max(self.total, 1))
            bar = "[" + "#" * filled + "-" * (20 - filled) + "] "
        text = (f"{self.label}{bar}{self.done}/{self.total} items, {items_s:.3g} items/s, {tokens_s:.3g} tokens/s, "
                f"{'?' if left is None else clock(left)} left")
        print(("\r" + text + "\033[K" + end) if self.tty else text, file=sys.stderr, flush=True)

    def summary(self) -> None:
        if self.tty:
            self.show(end="\n")
        elapsed, items_s, tokens_s = self.rates()
        print(f"{self.label}{self.items} items ({self.items - self.errors} answers, {self.errors} errors) in "
              f"{clock(elapsed)}: {items_s:.3g} items/s, {tokens_s:.3g} tokens/s", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# The run.

def generate_all(model, processor, items: List[Item], todo: List[int], sink, progress: Progress, args) -> None:
    """Runs the items `todo` (indices) through one engine, handing each finished item's line to `sink`."""
    settings = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    engine = Engine(model, processor, batch_size=args.batch_size)
    objects = ObjectReader(args.mask_decoder) if args.json else None
    running = {}  # uid -> [index, size of the first image, answer so far]
    queue = iter(todo)
    with engine.running():
        while True:
            # About one batch waits: its images are read at submit, so the whole dataset is never in memory.
            while len(engine.waiting) < args.batch_size:
                index = next(queue, None)
                if index is None:
                    break
                item = items[index]
                # A seed per item, so that sampled answers do not depend on which items share a batch or a rank.
                seed = None if args.seed is None else args.seed + index
                try:
                    if item.error:
                        raise InputError(item.error)
                    images = [load_image(source) for source in item.images]
                    uid = engine.submit(images, item.prompt, seed=seed, **settings)
                except InputError as e:
                    sink.add(index, line_of(item, error=str(e)))
                    progress.update(items=1, errors=1)
                    continue
                running[uid] = [index, images[0].size, ""]
            if not engine.has_work:
                break
            outputs = engine.step()
            for out in outputs:
                entry = running[out.uid]
                entry[2] += out.text
                if out.finish_reason:
                    index, size, text = running.pop(out.uid)
                    result = {"answer": text}
                    if objects is not None:
                        result["objects"] = objects_to_json(objects(text, size))
                    sink.add(index, line_of(items[index], **result))
                    progress.update(items=1)
            progress.update(tokens=len(outputs))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about every item of a JSONL file or a folder of images.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--input", required=True, help="a JSONL file (one item a line) or a folder of images")
    p.add_argument("--output", required=True, help="the JSONL file to write; rerun to resume")
    p.add_argument("--prompt", help='for items without one (required with a folder), e.g. "caption en"')
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="items decoded together")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="with --temperature: item i samples with seed + i")
    p.add_argument("--json", action="store_true", help="add the objects of detect/segment answers")
    p.add_argument("--mask-decoder", metavar="PATH", help="vae-oid.npz or its safetensors copy, for segment "
                   "answers (default: big_vision's, downloaded once)")
    return p


def check_args(args) -> None:
    """Every problem a run can know before loading the model, as one line."""
    check_generation_args(args.max_tokens, args.temperature, args.top_p, args.top_k, seed=args.seed)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    source, out = Path(args.input), Path(args.output)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    if source.is_dir() and args.prompt is None:
        raise InputError("a folder input needs --prompt")
    if out.is_dir():
        raise InputError(f"--output {out} is a folder: give a file name, e.g. {out / 'answers.jsonl'}")
    if out.exists() and out.resolve() == source.resolve():
        raise InputError("--output is the input file")
    if not out.parent.is_dir():
        raise InputError(f"output folder not found: {out.parent}")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"cannot write to {out if out.exists() else out.parent}")
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"mask decoder not found: {args.mask_decoder}")


def run(args) -> int:
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    label = f"[rank {rank}/{size}] " if size > 1 else ""
    check_args(args)
    out = Path(args.output)
    try:
        items = read_items(Path(args.input), args.prompt)
    except OSError as e:
        raise InputError(f"cannot read {args.input}: {cause(e)}") from None
    if not items:
        raise InputError(f"no items in {args.input}")
    # OUT lives on rank 0's machine; the other ranks learn from it how many items are done.
    written = items_in_output(out, items) if rank == 0 else 0
    written = broadcast_int(world, written) if size > 1 else written
    mine = [i for i in range(written, len(items)) if i % size == rank]
    found = items_in_parts(out, items, mine)
    todo = [i for i in mine if i not in found]

    share = len(range(rank, len(items), size))
    progress = Progress(share, share - len(todo), label)
    if size == 1:
        sink = OrderedOutput(out, written)
        for index in sorted(found):
            sink.add(index, found[index])
    else:
        sink = PartOutput(part_file(out, rank))
    if todo:
        from .loading import load

        model, processor = load(args.model, revision=args.revision)
        progress.tic = time.monotonic()  # rates count generation, not loading
        generate_all(model, processor, items, todo, sink, progress, args)
    sink.close()
    progress.summary()

    if size > 1:
        # Each rank's lines (from its part files, this run's and earlier runs') go to rank 0, which appends
        # them to OUT in input order.
        lines = gather_lines(world, items_in_parts(out, items, mine))
        if rank == 0:
            sink = OrderedOutput(out, written)
            for index in sorted(lines):
                sink.add(index, lines[index])
            sink.close()
        mx.distributed.all_sum(mx.array(0), group=world, stream=mx.cpu).item()  # OUT is on disk: parts may go
    for path in part_files(out):
        path.unlink(missing_ok=True)
    if rank == 0:
        print(f"{out}: {sink.next}/{len(items)} items ({written} were there before this run)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_main(main)
