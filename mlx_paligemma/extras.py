"""What pyproject.toml says of the package, as installed: its version, its install extras, the modules each extra
brings, and the one line that names a missing one."""

import importlib
from importlib import metadata

from .errors import InputError

try:
    VERSION = metadata.version("mlx-paligemma")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed: no metadata to read
    VERSION = "unknown (not installed)"

# Each extra and the modules it brings (a module that is imported only deep inside a package is named whole, so
# that a package that is there but broken is found out here, not after the work).
EXTRAS = {"server": ("starlette", "uvicorn"), "eval": ("pycocotools.cocoeval",), "report": ("matplotlib",),
          "structured": ("llguidance", "llguidance.numpy"), "data": ("datasets",),
          "tracking": ("tensorboard.summary.writer.event_file_writer",)}


def install_line(extra: str) -> str:
    # It works from an index, and in a clone once `pip install -e .` has run.
    return f'pip install "mlx-paligemma[{extra}]"'


def require(extra: str, what: str) -> None:
    """Before any work: the extra's modules are importable, or one InputError line naming them and the install line."""
    missing = list(dict.fromkeys(m.split(".")[0] for m in EXTRAS[extra] if not _importable(m)))
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise InputError(f'{" and ".join(missing)} {verb} needed for {what}: {install_line(extra)}')


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
