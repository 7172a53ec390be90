"""An OpenAI chat-completions request -> a checked Job: the prompt, its images (decoded), the engine's settings.

PaliGemma is not a chat model. The prompt is the text of the last user message and the images are that message's
images, in order; system messages and earlier turns are ignored. Everything here runs on the HTTP side (in a
thread pool: images are downloaded and decoded here), so a bad request is refused before it reaches the model.
"""

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps

from ..engine import check_generation_args
from ..processor import InputError, cause
from .worker import Job

TASKS = ("detect ", "segment ")  # prompts whose answers are parsed into objects unless the request says otherwise


@dataclass
class Limits:
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_images: int = 4
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 20 * 2**20  # one image, encoded, from a data URL, a URL or a file
    fetch_timeout: float = 10.0
    allow_local_files: bool = False


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, one-line message, the parameter at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)


def parse_request(body: Any, limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    prompt, sources = prompt_and_images(body.get("messages"))
    if len(sources) > limits.max_images:
        raise bad(f"{len(sources)} images in the message; this server takes at most {limits.max_images}",
                  "messages")
    images = [read_image(s, limits) for s in sources]
    objects = body.get("objects")
    if objects is None:
        objects = prompt.startswith(TASKS)
    elif not isinstance(objects, bool):
        raise bad(f"objects must be true or false, got {objects!r}", "objects")
    return Job(images, prompt, settings(body, limits), objects)


def prompt_and_images(messages: Any):
    """The last user message's text (parts joined by spaces, stripped) and its image URLs."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise bad("each message must be an object with a role and content", "messages")
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns or turns[-1].get("role") != "user":
        raise bad("PaliGemma is not a chat model: the prompt is the last message, which must be a user message "
                  "with the image(s) and the prompt text", "messages")
    content = turns[-1].get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad("the user message's content must be a string or a list of content parts", "messages")
    texts, sources = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise bad('an image_url part must be {"type": "image_url", "image_url": {"url": "..."}}', "messages")
            sources.append(url)
        else:
            raise bad(f"unsupported content part {str(part)[:80]}: use text and image_url parts", "messages")
    if not sources:
        raise bad("PaliGemma needs an image: the prompt is the last user message, and it has no image_url part "
                  "(images in earlier messages are not used)", "messages")
    return " ".join(texts).strip(), sources


def read_image(url: str, limits: Limits) -> Image.Image:
    if url.startswith("data:"):
        data = from_data_url(url, limits)
    elif url.startswith(("http://", "https://")):
        data = fetch(url, limits)
    elif limits.allow_local_files:
        path = Path(url[len("file://"):] if url.startswith("file://") else url)
        if not path.is_file():
            raise bad(f"image not found: {path}", "messages")
        if path.stat().st_size > limits.max_image_bytes:
            raise bad(f"image {path} is more than {limits.max_image_bytes} bytes", "messages")
        data = path.read_bytes()
    else:
        raise bad(f"image URL {url[:60]!r} is not a data: or http(s) URL (the server reads local files only with "
                  "--allow-local-files)", "messages")
    return decode_image(data, url if not url.startswith("data:") else "in the data URL", limits)


def from_data_url(url: str, limits: Limits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad("a data URL image must be base64: data:image/...;base64,...", "messages")
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise bad(f"an image in a data URL is more than {limits.max_image_bytes} bytes", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"the data URL's base64 does not decode: {cause(e)}", "messages") from None


def fetch(url: str, limits: Limits) -> bytes:
    """The URL's bytes, within the timeout (for the whole download, not only each read) and the size limit."""
    deadline = time.monotonic() + limits.fetch_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-paligemma-server"})
    try:
        with urllib.request.urlopen(request, timeout=limits.fetch_timeout) as response:
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise bad(f"image {url} is more than {limits.max_image_bytes} bytes", "messages")
                if time.monotonic() > deadline:
                    raise TimeoutError("timed out")
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except Exception as e:  # urllib raises many types (HTTPError, URLError, timeouts, bad status lines)
        reason = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
        raise bad(f"cannot fetch image {url}: {cause(reason) if isinstance(reason, Exception) else reason} "
                  f"(timeout {limits.fetch_timeout:g} s)", "messages") from None


def decode_image(data: bytes, where: str, limits: Limits) -> Image.Image:
    """Decoded in full now (a damaged image fails here), upright by its EXIF tag, as processor.load_image does
    for files, with this server's pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_image_pixels:
                raise bad(f"image {where} is {image.width}x{image.height} pixels, more than this server's limit of "
                          f"{limits.max_image_pixels}", "messages")
            image.load()
        return ImageOps.exif_transpose(image)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise bad(f"image {where} has too many pixels", "messages") from None
    except Exception as e:  # PIL raises many types for broken data
        raise bad(f"image {where} does not decode: {cause(e)}", "messages") from None


def settings(body: dict, limits: Limits) -> dict:
    """The engine's settings from OpenAI's parameters (and mlx-lm's extras top_k, min_p, repetition_penalty)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    elif isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
        raise bad(f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens}", "max_tokens")
    n = body.get("n", 1)
    if n != 1:
        raise bad(f"n must be 1, got {n!r}: one answer per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0):
            raise bad(f"{name} is not supported; use repetition_penalty", name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad("stop must be a non-empty string or a list of up to 4 of them", "stop")
    def value(name, default):  # JSON null means the default, as in OpenAI's API
        return default if body.get(name) is None else body[name]

    out = dict(max_tokens=max_tokens, temperature=value("temperature", 0.0), top_p=value("top_p", 1.0),
               top_k=value("top_k", 0), min_p=value("min_p", 0.0), repetition_penalty=body.get("repetition_penalty"),
               seed=body.get("seed"), stop=stop, logit_bias=logit_bias(body.get("logit_bias")))
    try:
        check_generation_args(**{k: v for k, v in out.items() if k not in ("stop", "logit_bias")})
    except InputError as e:
        raise bad(str(e), str(e).split()[0]) from None
    if out["temperature"] > 2:
        raise bad(f"temperature must be in [0, 2], got {out['temperature']}", "temperature")
    return out


def logit_bias(value: Any) -> Optional[dict]:
    """OpenAI's {"token id": bias in [-100, 100]} -> {int: float}; the engine checks the ids."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for k, v in value.items():
        try:
            token = int(k)
        except ValueError:
            raise bad(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad(f"logit_bias values must be numbers in [-100, 100], got {v!r}", "logit_bias")
        out[token] = float(v)
    return out or None
