"""A checked request's images read (a data URL's base64, a download, a local file) and decoded: its Job.

Each step that takes a while runs in a thread (downloads in threads of their own, `fetching`, since one may take its
whole deadline), but waiting for the decoding budget does not: a request waits on the event loop (decoding.py), so
however many images wait, the threads stay free for the requests that can go on.
"""

import base64
import binascii
import time

import anyio

from ..errors import InputError, cause
from ..processing.fetch import fetch, read_local, shown, unreachable
from . import decoding
from .chat import ApiError, Checked, Limits, bad
from .worker import Job


async def read_images(checked: Checked, limits: Limits, fetching: anyio.CapacityLimiter) -> Job:
    """The Job: the request's images, decoded and cut to the model's input size, and the first one's size as sent."""
    since = time.monotonic()  # the request's place in the line for the decoding budget
    images = [await read_image(url, limits, fetching, since) for url in checked.sources]
    return checked.job([image for image, _ in images], images[0][1])


async def read_image(url: str, limits: Limits, fetching: anyio.CapacityLimiter, since: float):
    """(the image at the model's input size, its size as sent)."""
    if url.startswith(("http://", "https://")):
        data = await anyio.to_thread.run_sync(download, url, limits, limiter=fetching)
        try:
            return await decode_image(data, shown(url), limits, since)
        except ApiError as e:
            if e.code == "too_many_pixels":  # a picture was read: its size tells nothing of the network
                raise
            # Not an image: as for an unreachable URL, so an open port reads the same as a closed one.
            raise bad(str(unreachable(url, limits.fetch_timeout, limits.max_image_bytes)), "messages") from None
    data = await anyio.to_thread.run_sync(read_bytes, url, limits)
    return await decode_image(data, "in the data URL" if url.startswith("data:") else shown(url), limits, since)


def download(url: str, limits: Limits) -> bytes:
    try:
        return fetch(url, limits.fetch_timeout, limits.max_image_bytes, limits.allow_private_urls,
                     user_agent="mlx-paligemma-server", hint="the server's --allow-private-urls")
    except InputError as e:  # refused by the policy (scheme, address), or the one neutral message
        raise bad(str(e), "messages") from None


def read_bytes(url: str, limits: Limits) -> bytes:
    """A data URL's bytes, or a local file's (check_source let only those through, and files only when allowed)."""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2], validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"the data URL's base64 does not decode: {cause(e)}", "messages") from None
    try:
        return read_local(url[len("file://"):] if url.startswith("file://") else url, limits.local_files,
                          limits.max_image_bytes)
    except InputError as e:
        raise bad(str(e), "messages") from None


async def decode_image(data: bytes, where: str, limits: Limits, since: float):
    """(the image at the model's input size, its size as sent): server.decoding's, its refusals as 400s."""
    try:
        return await decoding.decode_image(data, where, limits.max_image_pixels, limits.image_size, since)
    except decoding.TooManyPixels as e:
        raise ApiError(400, str(e), param="messages", code="too_many_pixels") from None
    except InputError as e:
        raise bad(str(e), "messages") from None
