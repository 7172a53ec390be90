"""Where items and examples come from, the same for batch, training and evaluation: one entry point (read_source,
and read_examples / read_training_sets on it) and one set of flags (add_data_arguments).

A source (`--data`, batch's `--input`) is any of:
- a JSONL file (mlx_paligemma.data.items), or a folder of them, one split per file (train.jsonl, valid.jsonl, test.jsonl);
- a folder written by datasets' `Dataset.save_to_disk` (one split) or `DatasetDict.save_to_disk` (its splits);
- parquet files: a file, a glob ("data/*.parquet": one split), or a folder (splits named by the files, as on the hub);
- a COCO annotation file (a .json of images, annotations, categories): detect examples (mlx_paligemma.data.coco);
- a Hugging Face hub dataset id, `owner/name` (mlx_paligemma.data.hub): downloaded once by datasets, then cached.
Dataset columns are mapped by --image-column, --prefix-column (a "prompt" column serves when there is no "prefix"),
--suffix-column or --prompt-template; relative image paths are read from --image-folder (default: the data's own
folder; for COCO its layout, val2017/ beside annotations/).
"""

import argparse
import glob
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .items import Example, Item, examples_of, read_items
from ..errors import InputError, cause

# A hub id is owner/name; a name that ends like a file is a missing file, not a dataset to look for on the hub.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
FILE_ENDINGS = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")
VALID_SPLITS, TEST_SPLIT = ("valid", "validation"), "test"


@dataclass
class DataOptions:
    image_column: str = "image"
    prefix_column: str = "prefix"
    suffix_column: str = "suffix"
    prompt_template: Optional[str] = None  # e.g. "answer en {question}": the prefix from the row's columns
    image_folder: Optional[str] = None  # where relative image paths point; None: the data's folder
    data_config: Optional[str] = None  # a hub dataset's configuration (subset)
    classes: Optional[List[str]] = None  # COCO: only these categories; None: all
    classes_per_prompt: int = 0  # COCO: classes named in one detect prompt; 0: all of an image's
    verbose: bool = False  # the datasets library's own progress bars and log lines (quiet by default)


def add_data_arguments(p: argparse.ArgumentParser, training: bool = False) -> None:
    """The data-source options, the same on lora, evaluate and batch; `training` gives the three splits lora reads
    instead of the one --split."""
    d = DataOptions()
    g = p.add_argument_group("data sources", "JSONL, Hugging Face datasets (hub id, save_to_disk folder, parquet) "
                             "and COCO annotation files; see docs/TRAINING.md")
    if training:
        g.add_argument("--train-split", default="train", help="the split to train on, when the data has several")
        g.add_argument("--valid-split", default=None, help="the validation split (default: valid or validation, "
                       "when present)")
        g.add_argument("--test-split", default=None, help="the split whose loss is printed at the end (default: "
                       "test, when present)")
    else:
        g.add_argument("--split", default=None, help="the split to read (default: the only one, or test)")
    g.add_argument("--image-column", default=d.image_column, help="dataset column holding the image")
    g.add_argument("--prefix-column", default=d.prefix_column, help="dataset column holding the prompt (default: "
                   "prefix, or prompt when there is no prefix column)")
    g.add_argument("--suffix-column", default=d.suffix_column, help="dataset column holding the answer, or a list "
                   "of answers")
    g.add_argument("--prompt-template", default=d.prompt_template, help='the prompt from columns instead, e.g. '
                   '"answer en {question}" (default: off)')
    g.add_argument("--image-folder", default=d.image_folder, help="where a dataset's or COCO file's relative image "
                   "paths point (default: the data's folder; COCO: val2017/ beside annotations/instances_val2017.json; "
                   "JSONL paths are relative to their file)")
    g.add_argument("--data-config", default=d.data_config, help="a hub dataset's configuration (subset) name")
    g.add_argument("--classes", default=None, type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   metavar="A,B", help="COCO: only these categories (default: all)")
    g.add_argument("--data-verbose", dest="verbose", action="store_true", help="show the datasets library's own "
                   "progress bars and log lines (default: only our one line when a source cannot be read)")
    g.add_argument("--classes-per-prompt", type=int, default=d.classes_per_prompt, help="COCO: classes named in "
                   "one detect prompt, 0: all those in the image")


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(**{k: getattr(args, k) for k in asdict(DataOptions())})


def kind_of(spec: str) -> str:
    """jsonl, jsonl-folder, saved, parquet, coco or hub; `folder` for a folder holding none of them (batch reads
    its images), `missing` for a path that is not there."""
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() == ".json" and is_coco(path):
            return "coco"
        return "parquet" if path.suffix.lower() == ".parquet" else "jsonl"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        if any(p.is_file() for p in path.glob("*.jsonl")):
            return "jsonl-folder"
        return "parquet" if any(path.rglob("*.parquet")) else "folder"
    if any(c in spec for c in "*?["):
        return "parquet" if glob.glob(spec, recursive=True) else "missing"
    if HUB_ID.fullmatch(spec) and not spec.lower().endswith(FILE_ENDINGS) and not spec.startswith("."):
        return "hub"
    return "missing"


def is_coco(file: Path) -> bool:
    """A .json file is COCO when its images list starts near the top (after `info` and `licenses`); any other is
    read as JSONL, as batch always read an items.json."""
    with open(file, "rb") as f:
        return b'"images"' in f.read(1 << 20)


def split_readers(spec: str, options: DataOptions = DataOptions(), split: Optional[str] = None,
                  prompt: Optional[str] = None, strict: bool = False) -> Dict[str, Callable[[], List[Item]]]:
    """{split: a function reading its items} of a source; `split` is a hint that spares a hub download of the
    others. `prompt` serves items without one (batch's --prompt)."""
    kind = kind_of(spec)
    if kind == "missing":
        raise InputError(f"no such file or folder {spec}, and not a hub dataset id (owner/name)")
    if kind == "folder":
        raise InputError(f"{spec} holds no data: JSONL files, parquet files or a folder written by save_to_disk")
    if kind == "jsonl":  # a source of one set is its training data, named as datasets name it
        return {"train": lambda: _jsonl(Path(spec), prompt)}
    if kind == "jsonl-folder":
        return {f.stem: (lambda f=f: _jsonl(f, prompt)) for f in sorted(Path(spec).glob("*.jsonl")) if f.is_file()}
    if kind == "coco":
        from .coco import coco_items

        return {"train": lambda: coco_items(spec, options.image_folder, options.classes, options.classes_per_prompt)}
    from .hub import dataset_items, load_splits

    sets = load_splits(spec, kind, split, options.data_config, options.verbose)
    if options.image_folder is not None:
        folder = Path(options.image_folder)
    elif kind == "hub":
        folder = Path(".")
    else:
        folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent  # a glob's too
    name = spec if len(sets) == 1 else None
    return {s: (lambda s=s, ds=ds: dataset_items(ds, name or f"{spec} [{s}]", folder, options, prompt, strict))
            for s, ds in sets.items()}


def _jsonl(file: Path, prompt: Optional[str]) -> List[Item]:
    try:
        items = read_items(file, prompt)
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or cause(e)}") from None
    for item in items:  # named by their file, also when read as a split of a folder
        item.where = f"{file}, line {item.line}"
    return items


def choose_split(spec: str, names, split: Optional[str]) -> str:
    if split is not None and split not in names:
        raise InputError(f"{spec} has no split {split!r} (its splits: {', '.join(names)})")
    if split is None and len(names) > 1:
        if TEST_SPLIT in names:
            return TEST_SPLIT
        raise InputError(f"{spec} has the splits {', '.join(names)}: give --split")
    return split or next(iter(names))


def read_source(spec: str, split: Optional[str] = None, options: DataOptions = DataOptions(),
                prompt: Optional[str] = None, strict: bool = False) -> List[Item]:
    """The items of one split of any source (the only one, or `test`, when `split` is None); each bad row is an
    item with its error, for batch to write and go on (with `strict`, a dataset's first bad row stops, named)."""
    readers = split_readers(spec, options, split, prompt, strict)
    return readers[choose_split(spec, list(readers), split)]()


def read_examples(spec: str, split: Optional[str] = None, options: DataOptions = DataOptions()) -> List[Example]:
    """Training or evaluation examples of one split, every image opened now; the first bad row stops, named."""
    return examples_of(read_source(spec, split, options, strict=True), spec)


def read_training_sets(spec: str, options: DataOptions = DataOptions(), train: str = "train",
                       valid: Optional[str] = None, test: Optional[str] = None) -> Dict[str, List[Example]]:
    """{"train": ..., "valid": ..., "test": ...} as present, by split name: `train`, `valid` (default: valid or
    validation) and `test` (default: test). A file (JSONL, parquet, COCO) or a saved Dataset is one split, train."""
    readers = split_readers(spec, options, strict=True)
    names = list(readers)
    chosen = {"train": choose_split(spec, names, train),
              "valid": choose_split(spec, names, valid) if valid else next((s for s in VALID_SPLITS if s in names),
                                                                           None),
              "test": choose_split(spec, names, test) if test else (TEST_SPLIT if TEST_SPLIT in names else None)}
    return {role: examples_of(readers[s](), spec) for role, s in chosen.items() if s is not None}
