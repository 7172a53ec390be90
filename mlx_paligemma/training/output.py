"""What a training run owns in ADAPTER_PATH, and the check of that folder before any work (formats.ownership's rule):
the adapter files and the checkpoint's, `best/` holding adapter files only, and the log's (training.log.OWNED), each
file known as ours by the folder's record.

A rerun into a folder holding a checkpoint of ours (its step file, written last) needs --resume (go on) or
--overwrite (start again, replacing it); a folder holding only what a run stopped before its first checkpoint left
(a log, curves) is started again without either, and --resume starts it from step 0. Anything of someone else's
under our names is refused, flags or not: it is moved away by hand, or another --adapter-path given.
"""

import os
from pathlib import Path

from ..errors import InputError, cause
from ..formats.adapters import ADAPTER_FILE, CONFIG_FILE
from ..formats.atomic import clean_stale
from ..formats.ownership import FILE, RECORDED, check_names
from .log import OWNED as LOG_OWNED

# Written beside the adapters at every save, to resume from: optimizer state, and the step in trainer_state.json
# (the data order and each step's random draws follow from the seed and the step). The step is written last: a
# folder without it holds no checkpoint.
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
BEST_DIR = "best"  # --keep-best: the best-scoring adapters
OWNED = {ADAPTER_FILE: FILE, CONFIG_FILE: FILE, OPTIMIZER_FILE: FILE, STATE_FILE: FILE, BEST_DIR: RECORDED,
         **LOG_OWNED}


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FILE).is_file()


def check_output_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: adapter_path is a folder we can write, holds no checkpoint we would replace unasked, holds
    something to resume from when --resume is given, and where a run writes (its files, `best/`, the TensorBoard
    folder, at every depth) holds nothing a run did not write. What a killed run left under temporary names there
    is removed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--adapter-path {folder} is a file, not a folder")
    check_names(folder, OWNED, f"--adapter-path {folder}", "training run")
    ours = [name for name in OWNED if (folder / name).exists()]
    if has_checkpoint(folder) and not resume and not overwrite:
        raise InputError(f"{folder} already holds adapters ({', '.join(ours)}): give --resume to go on training "
                         "them, --overwrite to replace them, or another --adapter-path")
    if resume and not ours:
        raise InputError(f"nothing to resume in {folder}: no checkpoint and nothing of an earlier run; leave out "
                         "--resume to start training there")
    try:  # a real write, not os.access: root passes access checks on read-only file systems
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to --adapter-path {folder}: {e.strerror or cause(e)}") from None
    for name, kind in OWNED.items():
        if kind == FILE:
            clean_stale(folder / name)
        elif kind == RECORDED and (folder / name).is_dir():
            for inner in (ADAPTER_FILE, CONFIG_FILE):
                clean_stale(folder / name / inner)
