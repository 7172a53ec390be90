"""The server's image decoding, within one memory budget for all requests together (limits.LIMITS
.decode_budget_bytes, --decode-budget-bytes): each image is weighed from its header (pixels, mode, EXIF turn)
before a pixel is decoded, and decodes only while the images decoding at that moment weigh no more than the budget
together; the others wait their turn. An image that alone weighs more is refused. Its weight is the most its
decoding holds at once: the decoded pixels (PIL keeps RGB in 4 bytes a pixel), a turned copy, and what to_rgb's
conversion makes (nothing for RGB, which is resized as it is: the same pixels). The figures of an image flood, before
and after: docs/SERVER.md (benchmarks/image_flood.py).
"""

import io
import threading
import warnings

from PIL import Image, ImageOps

from .. import limits
from ..errors import InputError, cause
from ..processing.images import to_rgb

# PIL allocates big images in blocks; at 64 MiB each is above glibc's largest mmap threshold (32 MiB), so a freed
# image goes back to the system at once instead of staying in the allocator arenas of the decoding threads.
Image.core.set_block_size(64 << 20)
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # bytes a pixel; others 4
# Bytes a pixel that to_rgb makes: none for RGB; numpy float64 arrays for 16-bit and float images; an RGBA copy, a
# white background, their composite and its RGB for images with transparency; one RGB copy for the rest.
_CONVERSION = {"RGB": 0, "I": 36, "F": 36, "I;16": 36, "I;16B": 36, "I;16L": 36, "I;16N": 36}
_ALPHA = 20


class TooManyPixels(InputError):
    """An image over the pixel limit, or over the decoding budget alone."""


def decode_cost(image: Image.Image) -> int:
    """The bytes decoding this opened, not yet loaded, image holds at most, from its header alone."""
    stored = _STORED.get(image.mode, 4)
    alpha = "A" in image.mode or "a" in image.mode or image.info.get("transparency") is not None
    turned = _turned(image)
    per_pixel = stored * (2 if turned else 1) + (_ALPHA if alpha else _CONVERSION.get(image.mode, 4))
    return image.width * image.height * per_pixel


ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
_LATE_EXIF = ("PNG", "WEBP")  # formats whose EXIF may follow the pixels: known only once they are decoded


def _turned(image: Image.Image) -> bool:
    """Whether exif_transpose will copy the image, from what opening it read (image.getexif() would decode a
    PNG's pixels to look for EXIF after them): when that cannot be known, it may."""
    raw = image.info.get("exif")
    if raw is None:
        return image.format in _LATE_EXIF
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(ORIENTATION, 1) != 1


class _Budget:
    """The bytes being decoded now, all requests together."""

    def __init__(self):
        self.used, self.changed = 0, threading.Condition()

    def hold(self, cost: int, where: str) -> "_Held":
        budget = limits.LIMITS.decode_budget_bytes
        if cost > budget:
            raise TooManyPixels(f"image {where} takes about {cost / 1e6:.0f} MB to decode, more than this server's "
                                f"budget of {budget / 1e6:.0f} MB")
        return _Held(self, cost)


class _Held:
    def __init__(self, budget: _Budget, cost: int):
        self.budget, self.cost = budget, cost

    def __enter__(self):
        budget = self.budget
        with budget.changed:  # waits while others decode; each decode is bounded, so the wait is too
            budget.changed.wait_for(lambda: budget.used + self.cost <= limits.LIMITS.decode_budget_bytes)
            budget.used += self.cost

    def __exit__(self, *_):
        with self.budget.changed:
            self.budget.used -= self.cost
            self.budget.changed.notify_all()


DECODING = _Budget()


def decode_image(data: bytes, where: str, max_pixels: int, image_size=None):
    """Decoded in full now (a damaged image fails here), upright by its EXIF tag, as processor.load_image does
    for files, within the pixel limit and the decoding budget; then cut to the model's input size by exactly the
    processor's own first steps (to_rgb, bicubic), so answers are unchanged. (image, its size as sent)."""
    image = _open(data, where, max_pixels)
    with DECODING.hold(_read(lambda: decode_cost(image), where), where):
        image = _read(lambda: ImageOps.exif_transpose(_loaded(image), in_place=True) or image, where)
        size = image.size
        if image_size:
            if image.mode != "RGB" or image.info.get("transparency") is not None:
                image = to_rgb(image)  # an RGB image is its own conversion (to_rgb would copy it)
            image = image.resize((image_size, image_size), Image.BICUBIC)
    return image, size


def _loaded(image: Image.Image) -> Image.Image:
    image.load()
    return image


def _read(step, where: str):
    try:
        return step()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise TooManyPixels(f"image {where} has too many pixels") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"image {where} does not decode: not an image format PIL reads") from None
    except Exception as e:  # PIL raises many types for broken data
        raise InputError(f"image {where} does not decode: {cause(e)}") from None


def _open(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """The image's header, its pixels not decoded yet, within the pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
        image = _read(lambda: Image.open(io.BytesIO(data)), where)
    if image.width * image.height > max_pixels:
        raise TooManyPixels(f"image {where} is {image.width}x{image.height} pixels, more than this server's limit "
                            f"of {max_pixels}")
    return image
