"""PaliGemma 1 and 2 in MLX: processor -> vision -> projector -> language -> generate."""

import ctypes
import ctypes.util
import sys
import warnings

if sys.platform == "linux" and "mlx.core" not in sys.modules:
    # MLX's Linux CPU wheel calls a bundled reference BLAS (float32 GEMM at a few GFLOP/s). A system OpenBLAS
    # (Debian/Ubuntu: libopenblas0) loaded globally before MLX provides the same cblas symbols 30-50x faster.
    _openblas = ctypes.util.find_library("openblas")
    if _openblas:
        try:
            ctypes.CDLL(_openblas, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass

# `python -m mlx_paligemma.generate` runs a module this package has already imported for its API; runpy's
# warning about that is harmless here and would clutter every command line run.
warnings.filterwarnings("ignore", message="'mlx_paligemma.*found in sys.modules", category=RuntimeWarning)

from .engine import Engine  # noqa: E402
from .generate import batch_generate, generate, generate_step, stream_generate  # noqa: E402
from .loading import load  # noqa: E402
from .processor import InputError, PaliGemmaProcessor, load_image  # noqa: E402

__all__ = ["load", "generate", "generate_step", "stream_generate", "batch_generate", "Engine", "PaliGemmaProcessor", "InputError", "load_image"]
__version__ = "0.1.0"
