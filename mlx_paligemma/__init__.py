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

# Loaded on first use, so `python -m mlx_paligemma.generate` does not import its own module twice.
_EXPORTS = {
    "load": "loading", "generate": "generate", "generate_step": "generate", "stream_generate": "generate",
    "PaliGemmaProcessor": "processor", "InputError": "processor", "load_image": "processor",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_paligemma' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
