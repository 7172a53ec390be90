"""Answer a prompt about every item of a JSONL file or a folder of images, into a JSONL file; resumable, and
split across processes or machines under `mlx.launch`.

    python -m mlx_paligemma.batch --model M --data items.jsonl --output answers.jsonl [--prompt "caption en"]
    python -m mlx_paligemma.batch --model M --data photos/ --output captions.jsonl --prompt "caption en"
    mlx.launch -n 2 --backend ring --python PY -- -m mlx_paligemma.batch --model M --data IN --output OUT

An input line is an item of mlx_paligemma.data.items's format, the one training and evaluation read: {"image": path or
URL (or a list of them), "prompt": "..." (or "prefix"), "id": ...} plus any fields of your own (a `suffix` is kept
as one); `id` defaults to the line number, `prompt` to --prompt, paths are relative to the file. So a training or
validation file runs as it is. A folder gives every image file in it and its subfolders, sorted by path. A Hugging
Face dataset, parquet files or a COCO annotation file (mlx_paligemma.data.sources, with its column flags) gives its rows,
each with its `id` and its image's path or row index (never its bytes). OUT gets
one line per item in input order: the item's fields (with its `id`, and `prompt` when it came from --prompt) plus
"answer" (and with --json, on detect/segment answers, "objects"), or "error" for an item that cannot be done: a
line that is not JSON, not UTF-8, nested too deeply, holds a lone surrogate, ... is an error line and the run
goes on. With `--adapter NAME=PATH` (repeated), LoRA adapters are loaded beside the base and an item's "adapter" field
runs it through one of them (items of different adapters share each step; docs/ADAPTERS.md).

OUT is this runner's own or nothing (mlx_paligemma.data.outputs): a rerun of the same command skips what OUT holds
and appends the rest, and any other existing file (and the input itself, by inode: hard links, symlinks) is refused
before anything is cut or appended. Under mlx.launch the items are dealt out round-robin to the ranks; each rank
appends its finished items to its own part file beside OUT (on its own machine) and at the end rank 0 gathers them
through mx.distributed and appends them to OUT in input order, so OUT is the same as one process writes.
"""

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from .cli import ArgumentParser, add_object_arguments, add_settings, message, plural, run_main, settings_of
from .extras import require
from .data.records import answer_record
from .data.outputs import (OrderedOutput, PartOutput, check_ours, check_same_run, items_in_output, items_in_parts,
                           line_of, part_file, part_files, place, record_run, start_over)
from .generation.constraints import cli_constraint
from .data.items import Item, read_items
from .tasks.detection import ObjectReader, check_min_score, objects_to_json
from .processing.answer_format import has_objects
from .generation.adapters import add_limit_arguments, command_adapters, named_folders
from .generation.engine import Engine
from .generation.runs import run_all
from .generation.settings import BY_NAME, CONSTRAINTS, check_kv_bits, check_settings
from .errors import InputError, cause, check_text
from .processing.images import load_image
from .data.sources import DataOptions, add_data_arguments, data_options, kind_of, read_source

PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (logs, mlx.launch)


# Input.

IMAGE_FOLDERS = ("folder", "jsonl-folder")  # a folder is its images, JSONL files beside them or not


def read_input(source: Path, prompt: Optional[str], options: DataOptions = DataOptions(),
               split: Optional[str] = None) -> List[Item]:
    """A folder of images, a JSONL file, or any other source of mlx_paligemma.data.sources (its rows' stored images
    are PIL images in the items, and their lines name them by path or row index)."""
    kind = kind_of(str(source))
    if kind in IMAGE_FOLDERS:
        return folder_items(source, prompt)
    if kind == "jsonl":
        return jsonl_items(source, prompt)
    return read_source(str(source), split, options, prompt)


def folder_items(folder: Path, prompt: str) -> List[Item]:
    from PIL import Image

    extensions = {e for e, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    # Names starting with a dot are skipped: macOS leaves ._NAME.jpg resource forks and .DS_Store beside images.
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in extensions and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [Item(n, {"id": n, "image": name, "prompt": prompt}, [str(folder / name)], prompt)
            for n, name in enumerate(files, 1)]


def jsonl_items(file: Path, prompt: Optional[str]) -> List[Item]:
    """One item per non-blank line; a line that is not a usable item still is one, with an error, so that OUT has
    a line for it and the run goes on. An item whose prompt came from --prompt says so in its fields."""
    items = read_items(file, prompt)
    for item in items:
        if item.error is None and "prompt" not in item.fields and "prefix" not in item.fields:
            item.fields = {**item.fields, "prompt": item.prompt}
    return items


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
        text = (f"{self.label}{bar}{self.done}/{self.total} items, {items_s:.2f} items/s, {tokens_s:.1f} tokens/s, "
                f"{'?' if left is None else clock(left)} left")
        print(("\r" + text + "\033[K" + end) if self.tty else text, file=sys.stderr, flush=True)

    def summary(self) -> None:
        if self.tty:
            self.show(end="\n")
        elapsed, items_s, tokens_s = self.rates()
        print(f"{self.label}{plural(self.items, 'item')} ({plural(self.items - self.errors, 'answer')}, "
              f"{plural(self.errors, 'error')}) in "
              f"{clock(elapsed)}: {items_s:.2f} items/s, {tokens_s:.1f} tokens/s", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# The run.

def generate_all(model, processor, items: List[Item], todo: List[int], sink, progress: Progress, args) -> None:
    """Runs the items `todo` (indices) through one engine, handing each finished item's line to `sink`: its answer,
    or an error line when the item cannot be done (a bad image or setting, or its own constraint failing while it
    is decoded); the other items go on."""
    settings = settings_of(args, "batch")
    seed = settings.pop("seed")
    run = cli_constraint(args)
    engine = Engine(model, processor, batch_size=args.batch_size, kv_bits=args.kv_bits,
                    deterministic=args.deterministic)
    objects = ObjectReader(args.mask_decoder, processor.tokenizer.decode, args.min_score) if args.json else None
    sizes = {}

    def submit(index: int) -> int:
        item = items[index]
        if item.error:
            raise InputError(item.error)
        images = [load_image(source) for source in item.images]
        sizes[index] = images[0].size
        # A seed per item, so that sampled answers do not depend on which items share a batch or a rank.
        return engine.submit(images, item.prompt, seed=None if seed is None else seed + index,
                             adapter=item.fields.get("adapter"), **settings, **item_constraint(item, run))

    # About one batch waits: its images are read at submit, so the whole dataset is never in memory.
    for index, result in run_all(engine, ((i, partial(submit, i)) for i in todo), window=args.batch_size,
                                 on_step=lambda outputs: progress.update(tokens=len(outputs))):
        error = result if isinstance(result, InputError) else result.error
        if error is not None:
            sink.add(index, line_of(items[index], error=str(error)))
            progress.update(items=1, errors=1)
            continue
        line = answer_record(result, processor.tokenizer, args.logprobs is not None)
        if objects is not None and has_objects(items[index].prompt):
            line["objects"] = objects_to_json(objects.read(result, sizes[index]))
        sink.add(index, line_of(items[index], **line))
        progress.update(items=1)


ITEM_CONSTRAINTS = tuple(c for c in CONSTRAINTS if "batch" in BY_NAME[c].commands)  # an item's own fields


def item_constraint(item: Item, run: dict) -> dict:
    """An item's own constraint (its "json_schema", "regex", "choices" or "constrain" field) replaces the run's."""
    own = {k: item.fields[k] for k in ITEM_CONSTRAINTS if k in item.fields}
    if "choices" in own and isinstance(own["choices"], str):
        own["choices"] = own["choices"].split(",")
    return own or run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Answer a prompt about every item of a JSONL file or a folder of images.")
    p.add_argument("--model", required=True, help="MLX or Hugging Face folder, or hub id")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--adapter-path", default=None, help="LoRA adapters (or fine-tuned weights) written by "
                   "mlx_paligemma.lora, applied to --model")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help='LoRA adapters loaded beside --model under NAME (repeatable); an item\'s "adapter" field '
                        "chooses one (items without it: the base) (default: none)")
    add_limit_arguments(p)
    p.add_argument("--data", "--input", dest="input", metavar="DATA", required=True,
                   help="a JSONL file (one item a line), a folder of images, a Hugging Face dataset (hub id, "
                   "save_to_disk folder, parquet files) or a COCO annotation file")
    p.add_argument("--output", required=True, help="the JSONL file to write; rerun to resume (its settings, "
                   "recorded in OUTPUT.settings.json, must be the same)")
    p.add_argument("--overwrite", action="store_true", help="answer every item again: an OUTPUT of ours is "
                   "emptied first, whatever settings it was written with")
    p.add_argument("--prompt", help='for items without one (required with a folder), e.g. "caption en"')
    p.add_argument("--json", action="store_true", help='add "objects" (boxes, masks) to detect/segment answers')
    add_object_arguments(p)
    add_settings(p, "batch")
    add_data_arguments(p)
    return p


def check_writable(out: Path) -> None:
    """A real write test, not os.access, which says yes to root on a read-only file system: OUT opened for
    appending (which changes nothing in it), or a file made and removed beside it."""
    try:
        if out.exists():
            open(out, "ab").close()
        else:
            probe = out.with_name(f".{out.name}.write-test-{os.getpid()}")
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to {out if out.exists() else out.parent}: {e.strerror or cause(e)}") from None


def check_args(args) -> None:
    """Every problem a run can know before loading the model, as one line."""
    check_settings(**settings_of(args, "batch"))
    check_min_score(args.min_score)
    check_kv_bits(args.kv_bits)
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    source, out = Path(args.input), Path(args.output)
    kind = kind_of(args.input)
    if kind == "missing":
        raise InputError(f"input not found: {source}")
    if kind in IMAGE_FOLDERS and args.prompt is None:
        raise InputError("a folder input needs --prompt")
    if out.is_dir():
        raise InputError(f"--output {out} is a folder: give a file name, e.g. {out / 'answers.jsonl'}")
    if out.exists() and source.exists() and os.path.samefile(out, source):  # by inode: a hard link, a symlink
        raise InputError(f"--output {out} is the input file")
    if out.exists() and not out.is_file():
        raise InputError(f"--output {out} is not a regular file")
    if not out.parent.is_dir():
        raise InputError(f"output folder not found: {out.parent}")
    check_writable(out)
    if args.mask_decoder and not Path(args.mask_decoder).is_file():
        raise InputError(f"mask decoder not found: {args.mask_decoder}")
    command_adapters(args)
    if args.adapter and args.adapter_path is not None:
        raise InputError("give --adapter-path (one adapter, applied) or --adapter NAME=PATH (several, chosen per "
                         "item), not both")
    cli_constraint(args)  # a bad --json-schema file is named before the model loads
    if args.json_schema or args.regex or args.choices or args.constrain:
        require("structured", "structured output")


def asked(args) -> dict:
    """What a run is asked that its answers depend on: what its record keeps and a rerun must ask again."""
    run = {s: getattr(args, s) for s in ("deterministic", "kv_bits", "min_score")}
    return {"model": place(args.model), "revision": args.revision, "adapter_path": place(args.adapter_path),
            "adapters": {n: place(f) for n, f in named_folders(args.adapter, "--adapter").items()},
            "prompt": args.prompt, "json": args.json, "mask_decoder": place(args.mask_decoder),
            "settings": {**settings_of(args, "batch"), **cli_constraint(args), **run}}


def resumed(out: Path, items: List[Item], args) -> int:
    """How many items OUT holds for this run to go on from (0 with --overwrite), once its settings are known to be
    this run's; the run's record written."""
    wanted = asked(args)
    if out.exists() and out.stat().st_size:  # someone else's file is refused first, whatever was asked
        check_ours(out, items, args.input)
    if args.overwrite:
        start_over(out)
    check_same_run(out, wanted)
    written = items_in_output(out, items, args.input)
    record_run(out, wanted)
    return written


def run(args) -> int:
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    label = f"[rank {rank}/{size}] " if size > 1 else ""
    check_args(args)
    out = Path(args.output)
    try:
        items = read_input(Path(args.input), args.prompt, data_options(args), args.split)
    except OSError as e:
        raise InputError(f"cannot read {args.input}: {cause(e)}") from None
    if not items:
        raise InputError(f"no items in {args.input}")
    if args.overwrite:
        for path in part_files(out, items):  # each rank, those on its machine, before anything is written
            path.unlink()
    # OUT lives on rank 0's machine; the other ranks learn from it how many items are done (-1: none, refused).
    written, refused = 0, None
    if rank == 0:
        try:
            written = resumed(out, items, args)
        except InputError as e:
            written, refused = -1, e
    written = broadcast_int(world, written) if size > 1 else written
    if refused is not None or written < 0:
        raise refused or InputError("rank 0 refused the run: see its error")
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
        sink = PartOutput(part_file(out, rank), items)
    if todo:
        from .formats.loading import load

        model, processor = load(args.model, revision=args.revision, adapter_path=args.adapter_path,
                                adapters=named_folders(args.adapter, "--adapter") or None)
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
    for path in part_files(out, items):
        path.unlink(missing_ok=True)
    if rank == 0:
        print(f"{out}: {sink.next}/{len(items)} items ({written} were there before this run)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except InputError as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_main(main)
