"""The one JSONL item format, read by the dataset runner (batch), training and evaluation.

One item a line: {"image": path or URL (or a list of them), "prompt": "caption en", "suffix": "a cat", "id": ...}
plus any fields of your own. `prefix` is another name for `prompt` (training's word, PaliGemma's and big_vision's):
a line may give either, or both when they are equal. `suffix` (the answer to learn or score against) is optional
here; training needs it, and may give a list of answers (one example each). `candidates` (optional): the answers of
a multiple-choice question, which evaluation scores and picks among. Paths are relative to the file.
So a training or validation file can be batch-run as it is.

`read_items` never raises for a bad line: whatever Python raises while reading one (not UTF-8, malformed or
5000-deep JSON, a lone surrogate, ...) becomes that item's `error`, so a dataset run writes an error line for it and
goes on. `read_jsonl`, for training and evaluation, turns the first such error into one line naming file and line.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import InputError, cause, check_text, open_regular
from ..limits import MAX_LINE_BYTES
from ..processing.images import image_size, load_image

URL_SCHEMES = ("http://", "https://")


@dataclass
class Item:
    line: int  # line number in the file, from 1
    fields: dict  # the line's object with its "id" (default: the line number); what an output line repeats
    images: list = field(default_factory=list)  # paths (relative to the file's folder) or URLs; PIL images (datasets)
    prompt: str = ""
    suffixes: List[str] = field(default_factory=list)
    candidates: List[str] = field(default_factory=list)  # answers to choose among (multiple choice), if given
    error: Optional[str] = None  # set when the line is not a usable item
    where: str = ""  # for messages, when not "FILE, line N": "DATA, row N", "FILE, image ID" (mlx_paligemma.data.sources)


def read_items(file, prompt: Optional[str] = None) -> List[Item]:
    """One item per non-blank line of `file`; `prompt` for lines without one. The file is streamed, a line at most
    MAX_LINE_BYTES (a longer one is its item's error, skipped without being held); only reading the file itself can
    raise: OSError, or InputError for what is not a regular file (a FIFO would block, /dev/zero never ends). Lines
    are split on b"\\n" alone, as they are written (json.dumps escapes it, never the other characters
    str.splitlines takes for line ends)."""
    file = Path(file)
    items = []
    with os.fdopen(open_regular(file), "rb") as f:
        for n in range(1, 1 << 62):  # until the end of the file
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # the rest of the line, read and dropped
                    raw = f.readline(1 << 20)
                items.append(Item(n, {"id": n}, error=f"the line is longer than the limit of {MAX_LINE_BYTES} bytes"))
                continue
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            if raw.strip():
                items.append(parse_line(raw, n, file.parent, prompt))
    return items


def parse_line(raw: bytes, n: int, folder: Path, prompt: Optional[str]) -> Item:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Item(n, {"id": n}, error="not UTF-8 text")
    try:
        row = json.loads(text)
    except RecursionError:
        return Item(n, {"id": n}, error="not valid JSON: nested too deeply")
    except json.JSONDecodeError as e:
        return Item(n, {"id": n}, error=f"not valid JSON: {e}")
    except Exception as e:  # ValueError for an integer of more than 4300 digits, MemoryError, ...
        return Item(n, {"id": n}, error=f"not valid JSON: {cause(e)}")
    if not isinstance(row, dict):
        return Item(n, {"id": n}, error="expected an object with image and prompt (or prefix)")
    fields = row if "id" in row else {"id": n, **row}
    try:
        parsed = parse_item(row, folder, prompt)
    except InputError as e:
        parsed = e
    try:  # every field must go back out as UTF-8 JSON, or no output line can repeat them
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except Exception:
        fields = {"id": n}
        if not isinstance(parsed, InputError):
            parsed = InputError("holds text that is not valid Unicode (a lone surrogate): it cannot be written back")
    if isinstance(parsed, InputError):
        return Item(n, fields, error=str(parsed))
    return Item(n, fields, *parsed)


def parse_item(row: dict, folder: Path, default_prompt: Optional[str]):
    """(images, prompt, suffixes, candidates) of a line's object, or InputError saying what is wrong with it."""
    images = row.get("image")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise InputError("'image' must be a path or URL, or a list of them")
    images = [image_source(i, folder) for i in images]

    given = [k for k in ("prompt", "prefix") if k in row]
    for key in given:
        if not isinstance(row[key], str):
            raise InputError(f"{key!r} must be a string")
        check_text(row[key], key)
    if len(given) == 2 and row["prompt"] != row["prefix"]:
        raise InputError("'prompt' and 'prefix' differ: they are the same thing, give one")
    text = row[given[0]] if given else default_prompt
    if not isinstance(text, str):
        raise InputError("no prompt: give 'prompt' (or 'prefix') in the line, or --prompt")
    check_text(text, "prompt")

    suffixes = row.get("suffix", [])
    suffixes = [suffixes] if isinstance(suffixes, str) else suffixes
    if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
        raise InputError("'suffix' must be a string or a list of strings")
    for s in suffixes:
        check_text(s, "suffix")
    candidates = row.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates) or (
            "candidates" in row and len(set(candidates)) < 2):
        raise InputError("'candidates' must be a list of at least two different strings")
    for c in candidates:
        check_text(c, "candidate")
    return images, text, suffixes, candidates


def image_source(source: str, folder: Path) -> str:
    """An image named in a data file: a URL as given, a path taken from the data file's folder."""
    if source.startswith(URL_SCHEMES):
        return source
    path = folder / source
    try:  # what opening it would fail on, said now: a NUL, a lone surrogate the file system cannot take
        if "\0" in source:
            raise ValueError("embedded null byte")
        os.fsencode(path)
    except ValueError as e:
        raise InputError(f"image {source!r} is not a usable path: {cause(e)}") from None
    return str(path)


# Training and evaluation: every line must be an example.

@dataclass
class Example:
    image: object  # a file path, or a PIL image downloaded from a URL
    prefix: str
    suffix: str
    source: str = ""  # the line's `image` as written
    where: str = ""  # "FILE, line N", for messages about this example
    candidates: Tuple[str, ...] = ()  # a multiple-choice question's answers (evaluate scores each, picks the likeliest)


def read_jsonl(file) -> List[Example]:
    """Every line parsed and its image checked now (see examples_of), so a bad line stops the run before training,
    naming the line."""
    try:
        items = read_items(file)
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or cause(e)}") from None
    return examples_of(items, file)


def not_an_example(item: Item) -> Optional[str]:
    """Why an item cannot be a training or evaluation example, or None."""
    if item.error:
        return item.error
    if len(item.images) != 1:
        return f"an example takes one image, this one has {len(item.images)}"
    if not item.suffixes:
        return "'suffix' is missing: nothing to learn or score against"
    if not all(item.suffixes):
        return "empty suffix, nothing to learn"
    return None


def examples_of(items: List[Item], name) -> List[Example]:
    """The examples of items from any source (mlx_paligemma.data.sources); the first item that is not an example
    stops with one line naming it (`name`, line N, or the item's own `where`). Every item is checked before any
    image is decoded, so a bad last row of a large set is named at once: its fields, then each image file's header
    (it exists, is an image PIL reads, within the pixel limit; its pixels are decoded once, when it is used). A URL
    is downloaded (once however many lines name it) after every other check."""
    for item in items:
        where = item.where or f"{name}, line {item.line}"
        problem = not_an_example(item)
        if problem:
            raise InputError(f"{where}: {problem}")
        image = item.images[0]
        if isinstance(image, str) and not image.startswith(URL_SCHEMES):
            try:
                image_size(image)
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
    examples, downloaded = [], {}
    for item in items:
        where = item.where or f"{name}, line {item.line}"
        image = item.images[0]
        if isinstance(image, str) and image.startswith(URL_SCHEMES):
            try:
                image = downloaded[image] if image in downloaded else downloaded.setdefault(image, load_image(image))
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            source = item.fields["image"] if isinstance(item.fields.get("image"), str) else item.images[0]
        elif isinstance(image, str):
            source = item.fields["image"] if isinstance(item.fields.get("image"), str) else image
        else:  # a PIL image its reader decoded (a dataset's stored bytes), checked there
            source = str(item.fields.get("image"))
        examples += [Example(image, item.prompt, s, source, where, tuple(item.candidates)) for s in item.suffixes]
    if not examples:
        raise InputError(f"{name} holds no examples")
    return examples
