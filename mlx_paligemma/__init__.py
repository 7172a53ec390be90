"""PaliGemma 1 and 2 in MLX: processor -> vision -> projector -> language -> generate."""

import ctypes
import ctypes.util
import sys

if sys.platform == "linux" and "mlx.core" not in sys.modules:
    # MLX's Linux CPU wheel calls a bundled reference BLAS (float32 GEMM at a few GFLOP/s). A system OpenBLAS
    # (Debian/Ubuntu: libopenblas0) loaded globally before MLX provides the same cblas symbols 30-50x faster.
    _openblas = ctypes.util.find_library("openblas")
    if _openblas:
        try:
            ctypes.CDLL(_openblas, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass

from .generate import generate, generate_step, stream_generate
from .loading import load
from .processor import InputError, PaliGemmaProcessor, load_image

__all__ = ["load", "generate", "generate_step", "stream_generate", "PaliGemmaProcessor", "InputError", "load_image"]
__version__ = "0.1.0"
