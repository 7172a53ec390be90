"""The server's image decoding, within one memory budget for all requests together (limits.LIMITS
.decode_budget_bytes, --decode-budget-bytes): each image is weighed from its header (pixels, mode, EXIF turn)
before a pixel is decoded, and decodes only while the images decoding at that moment weigh no more than the budget
together; the others wait their turn. An image that alone weighs more is refused. Its weight is the most its
decoding holds at once: the decoded pixels (PIL keeps RGB in 4 bytes a pixel), a turned copy, and what to_rgb's
conversion makes (nothing for RGB, which is resized as it is: the same pixels). The figures of an image flood, before
and after: docs/SERVER.md (benchmarks/image_flood.py).

An image waits on the event loop, holding no thread (the threads that read and decode are few, and a request
waiting in one held it from everybody, small or not); only its reading and, once granted, its decoding run in
threads. Whose turn it is alternates between the lightest image waiting and the one whose request has waited
longest: the lightest, so that a request of one small picture is not queued behind a flood of large ones; the oldest,
so that a large image is never starved however many light ones keep coming, and a request's images, once it is the
oldest, follow one another so that it finishes and lets go of its body. An image whose turn it is but which does
not fit yet is passed by lighter ones only while they leave it room (those that passed it weigh at most the budget
less its weight): they start at once beside the decodes running, and it starts as soon as those end. Turns are not
per client address: addresses do not tell clients apart (many behind one proxy or one NAT, every local one
127.0.0.1), and images are what cost.
"""

import asyncio
import contextlib
import io
import time
import warnings
from dataclasses import dataclass

import anyio
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
    """The bytes being decoded now, all requests together, and the images waiting for them (on the event loop)."""

    def __init__(self):
        self.used, self.waiting, self.lightest_next = 0, [], True
        self.passing = []  # images decoding that passed the one whose turn it is

    @contextlib.asynccontextmanager
    async def hold(self, cost: int, where: str, since: float):
        """Within: `cost` bytes of the budget, once the image may start (`since`: when its request came)."""
        budget = limits.LIMITS.decode_budget_bytes
        if cost > budget:
            raise TooManyPixels(f"image {where} takes about {cost / 1e6:.0f} MB to decode, more than this server's "
                                f"budget of {budget / 1e6:.0f} MB")
        turn = _Turn(cost, since, asyncio.get_running_loop().create_future())
        self.waiting.append(turn)
        self._grant()
        try:
            await turn.granted
        except BaseException:  # cancelled: while it waited, or once it could start
            if turn.granted.cancelled():
                self._grant()  # it leaves the line, where it may have held the others up
            else:
                self._release(turn)
            raise
        try:
            yield
        finally:
            self._release(turn)

    def _release(self, turn: "_Turn") -> None:
        self.used -= turn.cost
        if turn in self.passing:
            self.passing.remove(turn)
        self._grant()

    def _start(self, turn: "_Turn") -> None:
        self.waiting.remove(turn)
        self.used += turn.cost
        turn.granted.set_result(None)

    def _grant(self) -> None:
        budget = limits.LIMITS.decode_budget_bytes
        self.waiting = [t for t in self.waiting if not t.granted.cancelled()]
        while self.waiting:
            turn = min(self.waiting, key=(lambda t: (t.cost, t.since)) if self.lightest_next else lambda t: t.since)
            if self.used + turn.cost <= budget:
                self._start(turn)
                self.lightest_next, self.passing = not self.lightest_next, []
                continue
            room = budget - turn.cost - sum(t.cost for t in self.passing)
            light = [t for t in self.waiting if t.cost <= room and self.used + t.cost <= budget]
            if not light:
                return
            passer = min(light, key=lambda t: (t.cost, t.since))
            self._start(passer)
            self.passing.append(passer)


@dataclass(eq=False)
class _Turn:
    cost: int
    since: float
    granted: asyncio.Future


DECODING = _Budget()


async def decode_image(data: bytes, where: str, max_pixels: int, image_size=None, since=None):
    """Decoded in full (a damaged image fails here), upright by its EXIF tag, as processor.load_image does for
    files, within the pixel limit and the decoding budget; then cut to the model's input size by exactly the
    processor's own first steps (to_rgb, bicubic), so answers are unchanged. (image, its size as sent). `since`: when
    its request came (time.monotonic()), which orders the turns; now by default."""
    image, cost = await anyio.to_thread.run_sync(_weighed, data, where, max_pixels)
    async with DECODING.hold(cost, where, time.monotonic() if since is None else since):
        return await anyio.to_thread.run_sync(_decoded, image, where, image_size)


def _weighed(data: bytes, where: str, max_pixels: int):
    image = _open(data, where, max_pixels)
    return image, _read(lambda: decode_cost(image), where)


def _decoded(image: Image.Image, where: str, image_size):
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
