"""What a training run owns in ADAPTER_PATH, and the check of that folder before any work (formats.ownership's rule):
the adapter files and the checkpoint's, `best/` holding adapter files only, and the log's (training.log.OWNED)."""

import os
from pathlib import Path

from ..errors import InputError, cause
from ..formats.adapters import ADAPTER_FILE, CONFIG_FILE
from ..formats.ownership import FILE, check_names
from .log import OWNED as LOG_OWNED

# Written beside the adapters at every save, to resume from: optimizer state, and the step in trainer_state.json
# (the data order and each step's random draws follow from the seed and the step).
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
BEST_DIR = "best"  # --keep-best: the best-scoring adapters
OWNED = {ADAPTER_FILE: FILE, CONFIG_FILE: FILE, OPTIMIZER_FILE: FILE, STATE_FILE: FILE,
         BEST_DIR: lambda name: name in (ADAPTER_FILE, CONFIG_FILE), **LOG_OWNED}


def check_output_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: adapter_path is a folder we can write, holds no adapters we would replace unasked, and where
    a run writes (its files, `best/`, the TensorBoard folder, at every depth) holds nothing a run did not write."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--adapter-path {folder} is a file, not a folder")
    ours = [name for name in OWNED if (folder / name).exists() or (folder / name).is_symlink()]
    if ours and not resume and not overwrite:
        raise InputError(f"{folder} already holds adapters ({', '.join(ours)}): give --resume to go on training "
                         "them, --overwrite to replace them, or another --adapter-path")
    check_names(folder, OWNED, f"--adapter-path {folder}", "training run")
    try:  # a real write, not os.access: root passes access checks on read-only file systems
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to --adapter-path {folder}: {e.strerror or cause(e)}") from None
