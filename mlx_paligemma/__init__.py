"""PaliGemma 1 and 2 in MLX: processor -> vision -> projector -> language -> generate."""

import ctypes
import os
import sys
import warnings

# MLX's Linux CPU wheel calls a bundled reference BLAS (float32 GEMM at a few GFLOP/s). A system OpenBLAS loaded
# globally before MLX provides the same cblas symbols many times faster. Opening it by its soname (that of Debian's
# and Ubuntu's libopenblas0 packages, as of most distributions' openblas) is also the cheap test of whether there
# is one: ctypes.util.find_library runs ldconfig, and gcc when the library is missing.
OPENBLAS = "libopenblas.so.0"
QUIET_BLAS = "MLX_PALIGEMMA_QUIET_BLAS"  # =1 silences the line below (docs/SPEED.md#linux-cpus-openblas)
_blas_note = None
if sys.platform == "linux":
    # Too late if MLX is already imported, whatever we load now: CPython opens extension modules with RTLD_NOW, so
    # `import mlx.core` has already bound every cblas_* call of libmlx.so to the reference BLAS (tested: OpenBLAS
    # loaded globally after `import mlx.core`, even before any matmul, leaves GEMM at the reference speed). Only
    # loading OpenBLAS before MLX works: importing this package first, or LD_PRELOAD.
    _late = "mlx.core" in sys.modules
    try:
        ctypes.CDLL(OPENBLAS, mode=ctypes.RTLD_LOCAL if _late else ctypes.RTLD_GLOBAL)
    except OSError as e:
        _blas_note = ("no OpenBLAS found: MLX's CPU backend runs every matmul on its reference BLAS, about 30x "
                      "slower; install it: sudo apt-get install libopenblas0-pthread (Debian, Ubuntu; elsewhere "
                      f"your distribution's openblas), or set {QUIET_BLAS}=1 to hide this line"
                      if "No such file" in str(e) else
                      f"cannot load OpenBLAS ({e}): the CPU backend runs on MLX's reference BLAS, many times slower")
    else:
        if _late:
            _blas_note = ("mlx was imported before mlx_paligemma, too late to give it OpenBLAS: the CPU backend runs "
                          "on its reference BLAS, 30-50x slower; import mlx_paligemma first, or run with "
                          f"LD_PRELOAD={OPENBLAS}")

# `python -m mlx_paligemma.generate` runs a module this package has already imported for its API; runpy's
# warning about that is harmless here and would clutter every command line run.
warnings.filterwarnings("ignore", message="'mlx_paligemma.*found in sys.modules", category=RuntimeWarning)

import mlx.core as _mx  # noqa: E402

if _blas_note and _mx.default_device() == _mx.cpu and os.environ.get(QUIET_BLAS, "") in ("", "0"):
    print(f"mlx_paligemma: {_blas_note}", file=sys.stderr)

# The command module first: importing `mlx_paligemma.generate` (the module) later would rebind the package's
# attribute `generate` to it and hide the function, as in mlx-lm, whose layout this follows.
from . import generate as _generate_command  # noqa: E402, F401
from .errors import InputError  # noqa: E402
from .formats.loading import load  # noqa: E402
from .api import (BatchResponse, Generation, GenerationResult, batch_generate, generate, generate_step,  # noqa: E402
                  generate_tokens, stream_generate)
from .generation.engine import Engine  # noqa: E402
from .generation.scoring import score  # noqa: E402
from .processing.images import load_image  # noqa: E402
from .processing.processor import PaliGemmaProcessor  # noqa: E402

__all__ = ["load", "generate", "generate_tokens", "generate_step", "stream_generate", "batch_generate", "Engine",
           "PaliGemmaProcessor", "InputError", "load_image", "GenerationResult", "BatchResponse", "Generation", "score"]
from .extras import VERSION as __version__  # noqa: E402
