"""Images in: files, URLs and bytes decoded in full within a pixel limit, turned upright, and converted to RGB as
transformers' processor does."""

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError, cause


# Files and URLs with more pixels are refused (PIL's own default: 1 GiB / 4 / 3, about 9459 x 9459).
MAX_IMAGE_PIXELS = 89_478_485


ImageInput = Union[Image.Image, str, Path]


def load_image(source: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, a file path or an http(s) URL.

    A URL is fetched by mlx_paligemma.processing.fetch (http(s) only, a total deadline and a byte cap, public addresses only
    unless MLX_PALIGEMMA_ALLOW_PRIVATE_URLS=1). A file or URL is decoded in full here, so a damaged one fails at
    once, and turned upright by its EXIF orientation tag, as transformers' `load_image` does; one with more than
    `MAX_IMAGE_PIXELS` pixels is refused.
    Its mode is kept, so that a file gives the pixels of the same picture opened with PIL (transformers' own
    `load_image` converts to RGB and so drops the transparency that its processor composites onto white).
    A PIL image is used as given, as transformers' processor does: no EXIF rotation (apply
    `PIL.ImageOps.exif_transpose` first if it needs one) and no size limit. Its errors' `param` is `images`, the
    keyword that gave it.
    """
    try:
        return _load_image(source)
    except InputError as e:
        e.param = e.param or "images"
        raise


def _load_image(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, Path)):
        raise InputError(f"an image must be a PIL image, a file path or an http(s) URL, not {type(source).__name__}")
    path = str(source)
    source = path if path.isprintable() else repr(path)[1:-1]  # the message stays one line whatever the name
    if "://" in path:
        from .fetch import FETCH_TIMEOUT, MAX_FETCH_BYTES, fetch, unreachable

        # Within fetch.FETCH_TIMEOUT and MAX_FETCH_BYTES, public addresses only by default; a failure tells its
        # reason, to the person who asked (the server, answering others, fetches on its own and does not tell).
        data = fetch(path, tell=True)
        try:
            return _decode(io.BytesIO(data), source)
        except InputError:
            raise
        except Exception as e:  # fetched bytes that are not an image
            raise unreachable(path, FETCH_TIMEOUT, MAX_FETCH_BYTES, f"not an image ({cause(e)})") from None
    try:
        if Path(path).is_dir():
            raise InputError(f"{source} is a folder, not an image")
        if not Path(path).is_file():
            raise InputError(f"image not found: {source}")
        with open(path, "rb") as file:  # closed here, decoded or not (PIL keeps a GIF's file open otherwise)
            return _decode(file, source)
    except InputError:
        raise
    except Exception as e:
        raise _unreadable(e, source) from None


def image_size(path, data: Optional[bytes] = None) -> tuple:
    """(width, height) of an image file (or of `data`, its bytes, named `path`) as load_image would give it (upright
    by its EXIF tag), read from its header without decoding the pixels, within the pixel limit: the cheap check of a
    whole data set before the work."""
    path = str(path)
    source = path if path.isprintable() else repr(path)[1:-1]
    try:
        if data is None and Path(path).is_dir():
            raise InputError(f"{source} is a folder, not an image")
        if data is None and not Path(path).is_file():
            raise InputError(f"image not found: {source}")
        with (open(path, "rb") if data is None else io.BytesIO(data)) as file, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
            width, height = image.size
            if _orientation(image) in (5, 6, 7, 8):  # turned a quarter: exif_transpose swaps them
                width, height = height, width
    except InputError:
        raise
    except Exception as e:
        raise _unreadable(e, source) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"image {source} is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                         "(mlx_paligemma.processing.images.MAX_IMAGE_PIXELS)")
    return width, height


ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, without decoding the pixels: a PNG's or WebP's getexif() decodes them to look for EXIF
    after them, so for those only what opening the file read counts (a late tag is not seen here)."""
    if image.format not in ("PNG", "WEBP"):
        return image.getexif().get(ORIENTATION, 1)
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(ORIENTATION, 1)


def image_from_bytes(data: bytes, source: str) -> Image.Image:
    """A PIL image from the bytes of an image file (as datasets store images), decoded, turned upright and checked
    as load_image does a file; `source` names it in messages."""
    try:
        return _decode(io.BytesIO(data), source)
    except InputError:
        raise
    except Exception as e:
        raise _unreadable(e, source) from None


def _unreadable(e: Exception, source: str) -> InputError:
    if isinstance(e, Image.DecompressionBombError):  # PIL refuses twice its own limit before reading the size to us
        return InputError(f"image {source} is too large: more than {2 * Image.MAX_IMAGE_PIXELS} pixels")
    if isinstance(e, Image.UnidentifiedImageError):
        return InputError(f"cannot read image {source}: not an image format PIL reads")
    return InputError(f"cannot read image {source}: {cause(e)}")  # PIL raises many types; the cause is enough


def _decode(file, source: str) -> Image.Image:
    """The first picture in `file`, decoded in full and turned upright, within the pixel limit."""
    with warnings.catch_warnings():
        # The size check below replaces PIL's two-line warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(file)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(f"image {source} is {image.width}x{image.height} pixels, more than the limit of "
                         f"{MAX_IMAGE_PIXELS} (mlx_paligemma.processing.images.MAX_IMAGE_PIXELS)")
    image.load()
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as transformers' processor converts a PIL image: transparency composited onto white.

    Where transformers gives nonsense we differ: PIL's conversion clips wider values to 0..255, so 16-bit images
    turn almost white and 0..1 float images black. Integer images (I;16, I;16B, I;16L, I;16N and 32-bit I) are
    read as 16-bit, 0..65535, and divided by 257 (65535 -> 255), as an image viewer shows them; float images (F)
    are read as 0..1 and multiplied by 255; values outside are clipped, NaN is 0. La (premultiplied alpha), which
    PIL cannot convert to RGB and transformers refuses, goes through LA.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, np.float64)
        if image.mode == "F":
            values = np.clip(np.nan_to_num(values), 0, 1) * 255
        else:
            values = np.clip(values, 0, 65535) / 257
        image = Image.fromarray(np.round(values).astype(np.uint8))
    elif image.mode == "La":
        image = image.convert("LA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")
