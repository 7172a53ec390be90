"""PaliGemma 1 and 2 in MLX: processor -> vision -> projector -> language -> generate."""

from .generate import generate, generate_step, stream_generate
from .loading import load
from .processor import InputError, PaliGemmaProcessor, load_image

__all__ = ["load", "generate", "generate_step", "stream_generate", "PaliGemmaProcessor", "InputError", "load_image"]
__version__ = "0.1.0"
