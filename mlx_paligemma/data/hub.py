"""Hugging Face datasets as items: a hub id, a folder written by `save_to_disk`, or parquet files (a file, a folder, a
glob), read through the `datasets` library (the `data` extra: pip install "mlx-paligemma[data]").

Columns are taken by name (mlx_paligemma.data.sources.DataOptions). The image column holds what datasets store: its Image
feature, which parquet and arrow keep as {"bytes", "path"}, raw bytes, or path strings relative to the data's folder
(or http(s) URLs), one image or a list of them. Rows are read as stored (arrow), so images are never decoded twice:
stored bytes are decoded here, once per distinct image, and checked as files are (pixel limit, EXIF orientation);
paths are opened where files always are (training checks them at once, batch at submit). The prefix is a column, or
`--prompt-template` over the columns; the suffix a string or a list of strings (several answers, as in JSONL).
"""

import hashlib
import json
import string
from pathlib import Path
from typing import Dict, List, Optional

from .items import Item, image_source, not_an_example
from ..errors import InputError, cause, check_text
from ..extras import require
from ..processing.images import image_from_bytes, image_size

# The prefix column's other name, as in JSONL: a dataset with "prompt" but no "prefix" column needs no flag.
PREFIX_ALIAS = "prompt"


def datasets_library():
    require("data", "Hugging Face datasets and parquet files")
    import datasets

    return datasets


def load_splits(spec: str, kind: str, split: Optional[str] = None, config: Optional[str] = None,
                verbose: bool = False) -> Dict[str, object]:
    """{split name: datasets.Dataset} of a saved folder, parquet files or a hub id (`kind`, from sources.kind_of).
    A hub id asked for one split downloads only that one; one cached already needs no network. The library's own
    progress bars and log lines are quiet unless `verbose`: a broken file is our one line, not theirs before it."""
    datasets = datasets_library()
    if verbose:
        return _load_splits(datasets, spec, kind, split, config)
    logging = datasets.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity(logging.CRITICAL + 10)  # above every level the library logs at
    logging.disable_progress_bar()
    try:
        return _load_splits(datasets, spec, kind, split, config)
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _load_splits(datasets, spec: str, kind: str, split: Optional[str], config: Optional[str]) -> Dict[str, object]:
    try:
        if kind == "saved":
            loaded = datasets.load_from_disk(spec)
        elif kind == "parquet" and Path(spec).is_dir():  # splits from the file names, as the hub names them
            loaded = datasets.load_dataset("parquet", data_dir=spec)
        elif kind == "parquet":
            loaded = datasets.load_dataset("parquet", data_files={"train": spec})
        else:
            loaded = datasets.load_dataset(spec, config, split=split) if split else datasets.load_dataset(spec, config)
    except Exception as e:  # the library's messages run to several lines; its first says what went wrong
        raise InputError(f"cannot read {spec}: {cause(e)}") from None
    if isinstance(loaded, datasets.Dataset):
        return {split or "train": loaded}  # one saved Dataset is one set, whatever split it was cut from
    return dict(loaded)


def template_fields(template: str) -> List[str]:
    """The column names a --prompt-template like "answer en {question}" fills in ({{ and }} are braces)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise InputError(f"--prompt-template {template!r}: {cause(e)}") from None
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or spec or conversion:
            raise InputError(f"--prompt-template {template!r}: fields are column names in braces, like {{question}}")
        fields.append(name)
    return fields


def render(template: str, row: dict) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InputError(f"column {name!r} must be text or a number for --prompt-template, got "
                                 f"{type(value).__name__}")
            out.append(str(value))
    return "".join(out)


def dataset_items(dataset, name: str, folder: Path, options, default_prompt: Optional[str] = None,
                  strict: bool = False) -> List[Item]:
    """One item per row of `dataset`; a row that is not a usable item still is one, with its error (batch goes on),
    or with `strict` (training, evaluation) the first that is not an example stops, naming its row. A missing column stops at once, naming
    it and the columns present. Every row is checked (its columns, its stored images' headers) before any stored
    image is decoded, so a bad last row of a large set is named at once."""
    columns = list(dataset.column_names)

    def need(column: str, flag: str) -> None:
        if column not in columns:
            raise InputError(f"{name} has no column {column!r} (its columns: {', '.join(columns)}): give {flag}")

    need(options.image_column, "--image-column")
    prefix = None
    if options.prompt_template is not None:
        for field in template_fields(options.prompt_template):
            need(field, "a --prompt-template naming its columns")
    elif options.prefix_column in columns:
        prefix = options.prefix_column
    elif options.prefix_column == "prefix" and PREFIX_ALIAS in columns:
        prefix = PREFIX_ALIAS
    elif default_prompt is None:
        need(options.prefix_column, "--prefix-column, or --prompt-template such as \"answer en {question}\"")
    suffix = options.suffix_column if options.suffix_column in columns else None
    if suffix is None and options.suffix_column != "suffix":  # the default may be absent (batch needs no answers)
        need(options.suffix_column, "--suffix-column")
    stored: Dict[bytes, _Stored] = {}  # one per distinct stored image, shared by the rows that repeat it
    items, index = [], 0
    for batch in dataset.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            number = index + 1  # rows are counted from 1, as lines and images are: ids, messages, labels
            item = Item(number, _fields(row, number, options.image_column), where=f"{name}, row {number}")
            try:
                item.images = _images(row[options.image_column], options.image_column, folder, number, stored)
                if options.prompt_template is not None:
                    item.prompt = render(options.prompt_template, row)
                elif prefix is not None:
                    item.prompt = _text(row[prefix], prefix)
                else:
                    item.prompt = default_prompt
                check_text(item.prompt, "prompt")
                item.suffixes = _suffixes(row[suffix], suffix) if suffix is not None else []
            except InputError as e:
                item.error = str(e)
            if strict and not_an_example(item):
                raise InputError(f"{item.where}: {not_an_example(item)}")
            if not item.error and item.prompt not in (item.fields.get("prompt"), item.fields.get("prefix")):
                item.fields["prompt"] = item.prompt  # what was asked, when no column says it
            items.append(item)
            index += 1
    for item in items:  # every row checked: now the stored images are decoded, each once
        try:
            item.images = [image.decode() if isinstance(image, _Stored) else image for image in item.images]
        except InputError as e:
            if strict:
                raise InputError(f"{item.where}: {e}") from None
            item.error = item.error or str(e)
    return items


class _Stored:
    """A stored image whose header was checked (an image PIL reads, within the pixel limit), decoded once when
    every row has been checked."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.image = data, name, None
        image_size(name, data)

    def decode(self):
        if self.image is None:
            self.image, self.data = image_from_bytes(self.data, self.name), None
        return self.image


def _fields(row: dict, number: int, image_column: str) -> dict:
    """What an output line repeats: the row's id (default its number, from 1), its image named by its path or the
    row's number (never its bytes), and every other column that is JSON text."""
    value = row[image_column]
    labels = [_label(v, number) for v in (value if isinstance(value, list) else [value])]
    fields = {"id": number, "image": labels[0] if len(labels) == 1 else labels}
    for key, value in row.items():
        if key == image_column:
            continue
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except Exception:  # bytes, a lone surrogate, ...: not something a line can repeat
            continue
        fields[key] = value
    return fields


def _parts(value):
    """(bytes, path) of a stored image: datasets' {"bytes", "path"}, raw bytes or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = (None, value) if isinstance(value, str) else (value, None)
    return (data if isinstance(data, (bytes, bytearray)) and data else None,
            path if isinstance(path, str) and path else None)


def _label(value, number: int):
    """How lines name an image: its path as stored, or the row's number when it has none."""
    return _parts(value)[1] or number


def _images(value, column: str, folder: Path, number: int, stored: dict) -> list:
    """_Stored images for stored bytes (one per distinct image), path or URL strings for the rest."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InputError(f"'{column}' holds no image")
    images = []
    for v in values:
        data, path = _parts(v)
        if data is not None:
            key = hashlib.sha256(data).digest()
            if key not in stored:
                stored[key] = _Stored(bytes(data), path or f"row {number}")
            images.append(stored[key])
        elif path is not None:
            images.append(image_source(path, folder))
        else:
            got = ("an image with neither bytes nor a path" if isinstance(v, dict) and {"bytes", "path"} & set(v)
                   else "nothing" if v is None else type(v).__name__)
            raise InputError(f"'{column}' must hold an image (datasets' Image, bytes, or a path), got {got}")
    return images


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"'{column}' must be a string, got {'nothing' if value is None else type(value).__name__}")
    check_text(value, column)
    return value


def _suffixes(value, column: str) -> List[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise InputError(f"'{column}' must be a string or a list of strings, got {type(value).__name__}")
    for s in values:
        check_text(s, column)
    return values
