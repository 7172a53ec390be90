"""Costs bounded before the work (mlx_paligemma.limits): structured output's size, compile time and mask time, checked
when the constraint is made (before it is queued), and the server's image decoding within one memory budget for
all requests together. Every refusal is one line; what is checked is behaviour (the refusal, what ran at once,
memory read from /proc on Linux), never a time."""

import asyncio
import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma import limits
from mlx_paligemma.errors import InputError
from mlx_paligemma.generation.constraints import make_constraint
from mlx_paligemma.processing.images import to_rgb
from mlx_paligemma.server import decoding

pytest.importorskip("llguidance")
MODEL = FIXTURES / "paligemma2-tiny"
IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module")
def loaded():
    return mp.load(str(MODEL), dtype=mx.float32)


def refusal(loaded, **constraint) -> str:
    model, processor = loaded
    with pytest.raises(InputError) as e:
        make_constraint(processor, model.config.text_config.vocab_size, "caption en", **constraint)
    message = str(e.value)
    assert "\n" not in message and "<state>" not in message and len(message) < 500, message
    return message


@pytest.fixture
def configured():
    """limits.configure for one test, restored after it."""
    before = limits.LIMITS
    yield limits.configure
    limits.LIMITS = before


def test_choices_over_the_count_or_bytes_are_refused_before_compiling(loaded, configured):
    assert refusal(loaded, choices=[f"c{i}" for i in range(1_000_000)]) == (
        f"choices has 1000000 strings, more than the limit of {limits.LIMITS.max_choices}")
    configured(max_choices=3, max_constraint_bytes=10)
    assert refusal(loaded, choices=["a", "b", "c", "d"]) == "choices has 4 strings, more than the limit of 3"
    assert refusal(loaded, choices=["abcdef", "ghijkl"]) == "the choices is 12 bytes, more than the limit of 10"
    assert refusal(loaded, regex="a" * 11) == "the regex is 11 bytes, more than the limit of 10"
    assert refusal(loaded, json_schema={"type": "string"}).startswith("the json schema is ")


def test_a_number_past_float_range_in_a_schema_is_a_bad_input(loaded):
    assert refusal(loaded, json_schema={"type": "integer", "minimum": 10**400}).startswith("bad json schema: ")
    assert refusal(loaded, json_schema={"type": "number", "maximum": float("inf")}).startswith(
        "the json schema cannot be read: ")


@pytest.mark.parametrize("constraint", [
    dict(regex="((a{100}){100}){100}"),  # compiles, then fails at the first token (too many expressions)
    dict(regex="a{100000}"),  # follows, at about a second a token
    dict(json_schema={"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                 "required": [f"k{i}"]} for i in range(2100)]}),  # more items than a row takes
])
def test_grammars_that_would_fail_or_stall_later_are_refused_when_made(loaded, constraint):
    message = refusal(loaded, **constraint)
    assert any(words in message for words in ("to compile", "a token to follow", "fails at its first token",
                                              "fuel exhausted")), message


def test_a_constraint_failing_later_fails_its_row_in_one_line(loaded):
    model, processor = loaded
    constraint = make_constraint(processor, model.config.text_config.vocab_size, "x", regex="ab")
    not_b = int(np.flatnonzero(~constraint.allowed_np())[5])
    with pytest.raises(InputError) as e:
        constraint.advance(not_b)
    assert str(e.value).startswith(f"the constraint fails at token {not_b}: ") and "\n" not in str(e.value)


def test_usual_grammars_still_compile_within_the_limits(loaded):
    model, processor = loaded
    vocab = model.config.text_config.vocab_size
    for constraint in (dict(regex="[a-z]{1,20}"), dict(choices=["cat", "dog"]), dict(constrain=True),
                       dict(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})):
        assert make_constraint(processor, vocab, "detect cat ; dog", **constraint) is not None


# The server's image decoding.

def encoded(mode: str, size, **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", **save)
    return buffer.getvalue()


def test_decode_cost_is_read_from_the_header(configured):
    rgb = Image.open(io.BytesIO(encoded("RGB", (700, 500))))
    rgba = Image.open(io.BytesIO(encoded("RGBA", (700, 500))))
    gray16 = Image.open(io.BytesIO(encoded("I;16", (700, 500))))
    # A PNG's EXIF may follow its pixels: a turned copy is counted. The pixels are not decoded to find out.
    assert decoding.decode_cost(rgb) == 700 * 500 * (4 + 4) and rgb.tile  # tile: still to be decoded
    assert decoding.decode_cost(rgba) == 700 * 500 * (4 + 4 + 20)
    assert decoding.decode_cost(gray16) == 700 * 500 * (2 + 2 + 36)
    jpeg = io.BytesIO()
    Image.new("RGB", (700, 500)).save(jpeg, "JPEG")
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (700, 500)).save(turned, "JPEG", exif=exif)
    assert decoding.decode_cost(Image.open(jpeg)) == 700 * 500 * 4  # decoded as it is, resized without a copy
    assert decoding.decode_cost(Image.open(turned)) == 700 * 500 * 8
    configured(decode_budget_bytes=700 * 500 * 8 - 1)
    with pytest.raises(decoding.TooManyPixels, match=r"takes about 3 MB to decode, more than this server's budget "):
        asyncio.run(decoding.decode_image(encoded("RGB", (700, 500)), "1", 10**9, 224))


def test_decoding_equals_the_processors_steps():
    for image in (Image.open(IMAGES / "chelsea.jpg"), Image.new("RGBA", (300, 200), (10, 200, 30, 90)),
                  Image.new("LA", (64, 48), (100, 7))):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        mine, size = asyncio.run(decoding.decode_image(buffer.getvalue(), "x", 10**9, 224))
        want = to_rgb(Image.open(io.BytesIO(buffer.getvalue()))).resize((224, 224), Image.BICUBIC)
        assert size == image.size and mine.mode == "RGB" and np.array_equal(np.asarray(mine), np.asarray(want))


def test_concurrent_decodes_stay_within_the_budget(configured, monkeypatch):
    data = encoded("RGB", (500, 400))
    cost = 500 * 400 * 8
    configured(decode_budget_bytes=3 * cost)  # three at a time at most
    seen, lock = [], threading.Lock()
    inner = decoding._loaded

    def watched(image):
        with lock:
            seen.append(decoding.DECODING.used)
        return inner(image)

    monkeypatch.setattr(decoding, "_loaded", watched)

    async def all_at_once():
        return await asyncio.gather(*[decoding.decode_image(data, "x", 10**9, 224) for _ in range(48)])

    sizes = [size for _, size in asyncio.run(all_at_once())]
    assert sizes == [(500, 400)] * 48 and len(seen) == 48
    assert max(seen) <= 3 * cost and decoding.DECODING.used == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux: reads the server's memory in /proc")
def test_an_image_flood_stays_within_the_decode_budget():
    """8 clients, 4 PNGs of 3000x3000 each (small on the wire; 72 MB each to decode), against a 100 MB budget: the
    server's peak memory grows by no more than the budget and the images it keeps (each cut to 224 x 224), and it
    answers them all."""
    from test_server import Server, call

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (120, 30, 200)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    server = Server(MODEL, "--decode-budget-bytes", str(100 * 10**6), "--max-tokens-limit", "4")
    try:
        def status(key):
            text = Path(f"/proc/{server.process.pid}/status").read_text()
            return next(int(l.split()[1]) * 1024 for l in text.splitlines() if l.startswith(key))

        body = {"max_tokens": 2, "messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": url}}] * 4, {"type": "text", "text": "caption en"}]}]}
        assert call(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"},
                    timeout=300)[0] == 200  # warm: the model's first answer, its memory counted in the baseline
        before = status("VmHWM:")
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: call(server.url + "/v1/chat/completions", body,
                                                 {"Content-Type": "application/json"}, timeout=300)[0], range(8)))
        assert codes == [200] * 8
        grown = status("VmHWM:") - before
        assert grown < 100 * 10**6 + 64 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"
    finally:
        server.stop()


def test_the_limits_are_the_servers_flags():
    from mlx_paligemma.server.__main__ import build_parser

    help_text = build_parser().format_help()
    for flag in ("--max-choices", "--max-constraint-bytes", "--compile-seconds", "--mask-seconds",
                 "--decode-budget-bytes"):
        assert flag in help_text
    docs = (Path(__file__).parent.parent / "docs" / "SERVER.md").read_text()
    assert all(flag in docs for flag in ("--max-choices", "--decode-budget-bytes", "--compile-seconds"))
