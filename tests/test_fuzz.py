"""Fuzz: seeded random bytes and random valid-looking variants of every input a user gives.

Images (through `load_image` and the processor), the model folder's JSON files (through `mlx_paligemma.load`, then a
short generation), fine-tuning JSONL (through the trainer's reader and its batches), prompts (through the processor
and `generate`) and the options of `python -m mlx_paligemma.generate` (in-process through `main(argv)`, a few as real
subprocesses). The contract: success, or an `InputError` whose message is one non-empty line (command lines: exit
code 1, stderr exactly one line starting with `error: `, no traceback); any other exception fails the test. No input
file is ever changed (every input is hashed before and after).

    PALIGEMMA_FUZZ_CASES=2000 python -m pytest -q tests/test_fuzz.py     # a soak run (default: 40 per category)
    PALIGEMMA_FUZZ_SEED=7 python -m pytest -q tests/test_fuzz.py         # other cases (default seed 0)

Every case draws from `random.Random(f"{seed}:{category}:{index}")`, so a failing test id (e.g.
`test_image_file[17]`) with the same seed reproduces the same input.
"""

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES, MODELS
from mlx_paligemma.errors import InputError

CASES = int(os.environ.get("PALIGEMMA_FUZZ_CASES", "40"))
SEED = os.environ.get("PALIGEMMA_FUZZ_SEED", "0")
SUBPROCESS_CASES = max(2, min(CASES // 10, 4))
IMAGES = FIXTURES / "images"
CHELSEA = IMAGES / "chelsea.jpg"


def rng(category: str, i: int) -> random.Random:
    return random.Random(f"{SEED}:{category}:{i}")


def digest(*paths) -> dict:
    """sha256 of every file under `paths` (a file or a folder), by path."""
    out = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def within_contract(call, what: str):
    """call(): its result, or the InputError it raised (one non-empty line); anything else fails the test."""
    try:
        return call()
    except InputError as e:
        message = str(e)
        assert message.strip() and len(message.splitlines()) == 1, f"{what}: not one line: {message!r}"
        return e


# -- random values -----------------------------------------------------------------------------------------------

SPECIAL = ["<image>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<loc0001>", "<loc1023>", "<seg000>", "<seg127>",
           "<loc9999>", "<image", "image>", "<<image>>", "\n", "\r\n", "\t", "\x00", " "]


def random_text(r: random.Random, max_len: int = 60) -> str:
    """Random unicode: ASCII, control characters, lone surrogates, noncharacters, combining marks, emoji, RTL,
    special-token spam, and now and then something very long."""
    kind = r.random()
    if kind < 0.05:
        return ""
    if kind < 0.1:
        return r.choice(SPECIAL) * r.randint(1, 3000)
    if kind < 0.15:
        return "cat " * r.randint(1000, 6000)  # beyond the tiny models' context
    parts = []
    for _ in range(r.randint(1, max_len)):
        c = r.random()
        if c < 0.3:
            parts.append(chr(r.randint(32, 126)))
        elif c < 0.4:
            parts.append(chr(r.randint(0, 31)) if r.random() < 0.8 else "\x7f")
        elif c < 0.47:
            parts.append(chr(r.randint(0xD800, 0xDFFF)))  # lone surrogate
        elif c < 0.5:
            parts.append(r.choice(["\ufffe", "\uffff", "\ufeff", "\u200b", "\u202e", "\U0010ffff", "\U000e0001"]))
        elif c < 0.6:
            parts.append(chr(r.randint(0x300, 0x36F)))  # combining marks
        elif c < 0.7:
            parts.append(chr(r.randint(0x1F300, 0x1FAFF)))
        elif c < 0.8:
            parts.append(chr(r.randint(0x80, 0xFFFF)))
        else:
            parts.append(r.choice(SPECIAL))
    return "".join(parts)


def random_json_value(r: random.Random, depth: int = 0):
    c = r.random()
    if c < 0.1:
        return None
    if c < 0.2:
        return r.choice([True, False])
    if c < 0.4:
        return r.choice([0, 1, -1, 2, 3, 16, 56, 224, 2 ** 31, -2 ** 31, 2 ** 63, 10 ** 30, r.randint(-1000, 100000)])
    if c < 0.55:
        return r.choice([0.0, -0.0, 0.5, -1.5, 1e-300, 1e308, float("nan"), float("inf"), -float("inf"), r.random()])
    if c < 0.75:
        return random_text(r, 12)
    if depth > 2:
        return r.randint(-5, 5)
    if c < 0.88:
        return [random_json_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {random_text(r, 6): random_json_value(r, depth + 1) for _ in range(r.randint(0, 3))}


def flip_bits(r: random.Random, data: bytes, near_start: bool = False) -> bytes:
    data = bytearray(data)
    for _ in range(r.randint(1, 8)):
        i = r.randrange(min(len(data), 96) if near_start else len(data))
        data[i] ^= 1 << r.randrange(8)
    return bytes(data)


# -- 1. image files ----------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_header(r: random.Random) -> tuple:
    """A small file whose header declares a large picture: (bytes, extension)."""
    w, h = r.choice([(65535, 65535), (2 ** 31 - 1, 1), (1, 2 ** 31 - 1), (12000, 12000), (9460, 9460),
                     (r.randint(1, 70000), r.randint(1, 70000))])
    fmt = r.choice(["png", "gif", "bmp", "jpg"])
    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\x00" * r.randint(0, 64))
        chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + chunks, fmt
    if fmt == "gif":
        w, h = min(w, 65535), min(h, 65535)
        return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
                + b"\x02\x02\x44\x01\x00;"), fmt
    if fmt == "bmp":
        w, h = min(w, 2 ** 31 - 1), min(h, 2 ** 31 - 1)
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\x00" * 16, fmt
    data = bytearray(CHELSEA.read_bytes())  # JPEG: patch the frame header's size
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[sof + 5:sof + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
    return bytes(data), fmt


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "I;16B", "F"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP"}


def valid_image(r: random.Random) -> tuple:
    """A random small picture in a random mode, saved in a format that takes it: (bytes, extension)."""
    size = (r.randint(1, 40), r.randint(1, 40))
    mode = r.choice(MODES)
    base = Image.frombytes("RGB", size, bytes(r.randrange(256) for _ in range(size[0] * size[1] * 3)))
    image = base.convert(mode) if mode not in ("La", "RGBa", "I;16", "I;16B", "F", "PA", "LAB", "HSV") else None
    if image is None:
        image = Image.new(mode, size)
    for ext in r.sample(list(FORMATS), len(FORMATS)):
        buffer = io.BytesIO()
        try:
            image.save(buffer, FORMATS[ext])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return buffer.getvalue(), ext
    buffer = io.BytesIO()
    base.save(buffer, "PNG")  # a mode no format stores (La, RGBa)
    return buffer.getvalue(), "png"


@pytest.fixture(scope="module")
def seed_images():
    """The fixture images plus a small picture in every format: what the mutations start from."""
    out = {p.name: p.read_bytes() for p in sorted(IMAGES.iterdir())}
    small = Image.open(CHELSEA).convert("RGB").resize((24, 16))
    for ext, fmt in FORMATS.items():
        for mode in ("RGB", "P"):
            buffer = io.BytesIO()
            try:
                small.convert(mode).save(buffer, fmt)
            except (OSError, ValueError):
                continue
            out[f"small-{mode}.{ext}"] = buffer.getvalue()
    return out


def image_case(r: random.Random, seed_images: dict) -> tuple:
    """(what, bytes, file name) of one random image file."""
    kind = r.choice(["truncate", "flip", "flip-header", "splice", "random", "magic+random", "empty", "huge", "valid",
                     "valid"])
    name = r.choice(list(seed_images))
    data, ext = seed_images[name], name.rsplit(".", 1)[1]
    if kind == "truncate":
        data = data[:r.randrange(len(data))]
    elif kind in ("flip", "flip-header"):
        data = flip_bits(r, data, near_start=kind == "flip-header")
    elif kind == "splice":
        i = r.randrange(len(data))
        data = data[:i] + r.randbytes(r.randint(1, 64)) + data[i + r.randint(0, 64):]
    elif kind == "random":
        data = r.randbytes(r.randint(1, 2000))
    elif kind == "magic+random":
        data = data[:r.choice([2, 4, 8, 16, 32])] + r.randbytes(r.randint(0, 500))
    elif kind == "empty":
        data = b""
    elif kind == "huge":
        data, ext = huge_header(r)
    else:
        data, ext = valid_image(r)
    if r.random() < 0.2:  # the extension need not match the content
        ext = r.choice(["jpg", "jpeg", "png", "gif", "webp", "tif", "tiff", "bmp", "txt", ""])
    return f"{kind} of {name}", data, f"image.{ext}" if ext else "image"


@pytest.fixture(scope="module")
def processor():
    return mp.load(str(FIXTURES / "paligemma2-tiny"))[1]


@pytest.mark.parametrize("i", range(CASES))
def test_image_file(i, seed_images, processor, tmp_path):
    r = rng("image", i)
    what, data, name = image_case(r, seed_images)
    file = tmp_path / name
    file.write_bytes(data)
    before = digest(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be a second line on a command line's stderr
        loaded = within_contract(lambda: mp.load_image(file), what)
        batch = within_contract(lambda: processor(images=str(file), text="caption en"), what)
    assert isinstance(loaded, InputError) == isinstance(batch, InputError), what
    if what.startswith("valid"):
        assert not isinstance(loaded, InputError), f"{what}: a valid picture is refused: {loaded}"
    if not isinstance(batch, InputError):
        assert batch["pixel_values"].shape == (1, processor.image_size, processor.image_size, 3)
    assert digest(tmp_path) == before


def test_special_image_paths(processor, tmp_path):
    """A folder, a missing file, a path through a file, an empty name, odd characters: one line each."""
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    for source in [tmp_path / "folder.jpg", tmp_path / "missing.png", tmp_path / "file" / "inside.png", "",
                   tmp_path / "a\nb.png", tmp_path / ("x" * 300 + ".png"), "http://127.0.0.1:9/x.png", 12, None,
                   b"image.png"]:
        result = within_contract(lambda: mp.load_image(source), repr(source))
        assert isinstance(result, InputError), source


# -- 2. model folder files ---------------------------------------------------------------------------------------

MODEL_FILES = ["config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json"]


def random_path(r: random.Random, value) -> list:
    """A random path to a node of a JSON tree (not the root), shallow nodes more likely."""
    path = []
    while isinstance(value, (dict, list)) and value and (not path or r.random() < 0.55):
        key = r.choice(list(value)) if isinstance(value, dict) else r.randrange(len(value))
        path.append(key)
        value = value[key]
    return path


def mutate_json(r: random.Random, text: str) -> tuple:
    """(what, new bytes) for a JSON file: a field replaced, retyped or deleted, or the file itself broken."""
    kind = r.choice(["replace", "replace", "replace", "retype", "delete", "delete", "truncate", "random", "latin-1",
                     "utf-16", "not-object", "empty", "nested", "flip"])
    data = text.encode()
    if kind == "truncate":
        return kind, data[:r.randrange(len(data))]
    if kind == "random":
        return kind, r.randbytes(r.randint(1, 500))
    if kind == "latin-1":
        i = r.randrange(len(data))
        return kind, data[:i] + "é\xff".encode("latin-1") + data[i:]
    if kind == "utf-16":
        return kind, text.encode("utf-16")
    if kind == "not-object":
        return kind, json.dumps(random_json_value(r) if r.random() < 0.7 else [json.loads(text)]).encode()
    if kind == "empty":
        return kind, b""
    if kind == "nested":
        n = r.choice([10, 1000, 100000])
        return f"{kind} {n}", b"[" * n + b"]" * n
    if kind == "flip":
        return kind, flip_bits(r, data)
    tree = json.loads(text)
    path = random_path(r, tree)
    if not path:
        return kind, json.dumps(random_json_value(r)).encode()
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = r.choice([str(old), [old], {"value": old}, None, bool(old) if not isinstance(old, bool)
                                     else int(old)])
    else:
        parent[path[-1]] = random_json_value(r)
    return f"{kind} {path}", json.dumps(tree).encode()  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize("i", range(CASES))
def test_model_folder_file(i, tmp_path):
    r = rng("model", i)
    model = r.choice(MODELS)
    source = FIXTURES / model
    name = r.choice([n for n in MODEL_FILES if (source / n).is_file()])
    what, data = mutate_json(r, (source / name).read_text())
    what = f"{model}/{name}: {what}"
    folder = tmp_path / "model"
    folder.mkdir()
    for f in source.iterdir():  # links to the fixture files: they must come out unchanged
        if f.name != name:
            (folder / f.name).symlink_to(f)
    (folder / name).write_bytes(data)
    before = digest(folder, source, CHELSEA)
    loaded = within_contract(lambda: mp.load(str(folder)), what)
    if not isinstance(loaded, InputError):
        model_, processor_ = loaded
        within_contract(lambda: mp.generate(model_, processor_, images=str(CHELSEA), prompt="caption en",
                                            max_tokens=2).text, what)
    assert digest(folder, source, CHELSEA) == before


# -- 3. fine-tuning JSONL ----------------------------------------------------------------------------------------

def jsonl_line(r: random.Random) -> bytes:
    row = {"image": "img.png", "prefix": "caption en", "suffix": "a cat"}
    kind = r.random()
    if kind < 0.2:
        pass
    elif kind < 0.45:
        row[r.choice(list(row) + ["extra"])] = random_json_value(r)
    elif kind < 0.55:
        del row[r.choice(list(row))]
    elif kind < 0.7:
        row["image"] = r.choice(["missing.png", "sub", "", ".", "..", "../img.png", "bad.jpg", "sub/../img.png",
                                 str(CHELSEA), "http://127.0.0.1:9/x.png", "file:///etc/passwd", "\x00.png",
                                 random_text(r, 10)])
    elif kind < 0.85:
        row[r.choice(["prefix", "suffix"])] = random_text(r, 20)
    elif kind < 0.9:
        row["suffix"] = r.choice([[], ["a", "b"], ["a", 1], [""], [random_text(r, 5)]])
    else:  # the line itself broken
        line = json.dumps(row).encode()
        return r.choice([line[:r.randrange(len(line))], r.randbytes(r.randint(1, 40)), b"\xff\xfe" + line,
                         "\ufeff".encode() + line, line.replace(b"cat", b"c\xe9t"), b"[" * 5000 + b"]" * 5000,
                         b"null", b"[]", b"\x00", line + b"\r"])
    return json.dumps(row).encode()  # lone surrogates come out as \\udxxx escapes, which json.loads gives back


@pytest.mark.parametrize("i", range(CASES))
def test_jsonl_file(i, processor, tmp_path):
    from mlx_paligemma.data.items import read_jsonl
    from mlx_paligemma.training.trainer import make_batch

    r = rng("jsonl", i)
    (tmp_path / "img.png").write_bytes((IMAGES / "gray.png").read_bytes())
    (tmp_path / "bad.jpg").write_bytes(b"not a picture")
    (tmp_path / "sub").mkdir()
    lines = [jsonl_line(r) for _ in range(r.randint(1, 4))]
    file = tmp_path / "train.jsonl"
    file.write_bytes(r.choice([b"\n", b"\r\n", b"\n\n"]).join(lines))
    what = f"train.jsonl {lines!r}"[:2000]
    before = digest(tmp_path, CHELSEA)
    examples = within_contract(lambda: read_jsonl(file), what)
    if not isinstance(examples, InputError):
        assert examples
        within_contract(lambda: make_batch(processor, examples[:4]), what)
    assert digest(tmp_path, CHELSEA) == before


# -- 4. prompts --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_processor():
    return mp.load(str(FIXTURES / "paligemma-tiny"))


@pytest.mark.parametrize("i", range(CASES))
def test_prompt(i, model_and_processor):
    r = rng("prompt", i)
    model, processor_ = model_and_processor
    prompt = random_text(r)
    suffix = random_text(r, 10) if r.random() < 0.3 else None
    image = Image.open(CHELSEA)
    n_images = r.choice([1, 1, 1, 2])
    images = image if n_images == 1 else [image] * n_images
    what = f"prompt {prompt[:300]!r}, suffix {suffix!r}, {n_images} images"
    before = digest(CHELSEA)
    batch = within_contract(lambda: processor_(images=images, text=prompt, suffix=suffix), what)
    if not isinstance(batch, InputError) and suffix is None and len(prompt) < 2000:
        within_contract(lambda: mp.generate(model, processor_, images=images, prompt=prompt, max_tokens=2).text, what)
    assert digest(CHELSEA) == before


# -- 5. the generate command line --------------------------------------------------------------------------------

def cli_args(r: random.Random, folder: Path) -> list:
    """Random values for the options argparse accepts (ints where it wants ints, floats where it wants floats)."""
    args = ["--model", str(FIXTURES / r.choice(MODELS)), "--image", str(CHELSEA), "--prompt", "caption en"]
    big = 10 ** 20
    ints = lambda: str(r.choice([-1, 0, 1, 2, 3, -(10 ** 20), big, r.randint(-5, 5)]))  # noqa: E731
    floats = lambda: r.choice(["0", "-0", "1", "0.5", "-1", "nan", "inf", "-inf", "1e-320", "1e308", "1e999",  # noqa
                               str(r.uniform(-2, 2))])
    if r.random() < 0.6:
        args += [f"--max-tokens={r.choice([-1, 0, 1, 2, 3, -(10 ** 20)])}"]
    else:
        args += ["--max-tokens", "2"]  # never many: the tiny models rarely stop
    for option, value in [("--temperature", floats), ("--top-p", floats), ("--top-k", ints), ("--seed", ints),
                          ("--min-p", floats), ("--repetition-penalty", floats)]:
        if r.random() < 0.4:
            args += [f"{option}={value()}"]
    if r.random() < 0.2:
        args += ["--kv-bits", r.choice(["4", "8"])]
    if r.random() < 0.1:
        args += [f"--prompt={random_text(r, 20)}"]
    if r.random() < 0.1:
        args += ["--image", r.choice([str(folder / "missing.jpg"), str(folder), str(folder / "junk.png")])]
    if r.random() < 0.4:
        args += ["--draw=" + r.choice(["out.png", "out.jpg", "out", "out.PNG", "out.txt", "missing/out.png", ".",
                                     "sub", "sub/x.webp", "x" * 300 + ".png", "out.png/", "ro/out.png", "",
                                     "a\nb.png", str(folder / "junk.png")])]
        args += ["--mask-decoder", str(folder / "vae.npz")]  # junk: a segment answer fails without the network
    if r.random() < 0.2:
        args += ["--json"]
    return args


def cli_folder(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    (tmp_path / "junk.png").write_bytes(b"junk")
    (tmp_path / "vae.npz").write_bytes(b"junk")
    return tmp_path


def check_cli(rc: int, err: str, what: str) -> None:
    assert "Traceback" not in err, f"{what}: {err}"
    lines = err.strip("\n").splitlines()
    if rc == 0:
        assert not any(line.startswith("error") for line in lines), f"{what}: {err}"
    else:
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), f"{what}: rc {rc}, stderr {err!r}"


@pytest.mark.parametrize("i", range(CASES))
def test_generate_cli(i, tmp_path, monkeypatch, capsys):
    from mlx_paligemma.generate import main

    r = rng("cli", i)
    folder = cli_folder(tmp_path)
    monkeypatch.chdir(folder)
    args = cli_args(r, folder)
    before = digest(folder, CHELSEA, *(FIXTURES / m for m in MODELS))
    rc = main(args)
    check_cli(rc, capsys.readouterr().err, f"generate {args}")
    after = digest(folder, CHELSEA, *(FIXTURES / m for m in MODELS))
    drawn = [str(folder / a[len("--draw="):]) for a in args if a.startswith("--draw=")]
    assert {k: v for k, v in after.items() if k in before and k not in drawn} == \
        {k: v for k, v in before.items() if k not in drawn}
    new = set(after) - set(before)
    assert not [f for f in new if ".partial" in f], "a drawing's temporary file is left behind"
    if rc:
        assert not new, f"a failed run wrote {new}"


def _encodable(arg: str) -> bool:
    try:
        arg.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


@pytest.mark.parametrize("i", range(SUBPROCESS_CASES))
def test_generate_cli_subprocess(i, tmp_path):
    r = rng("cli-subprocess", i)
    folder = cli_folder(tmp_path)
    args = cli_args(r, folder)
    refused = i % 2 == 0  # half the cases: a bad image for sure, so the process ends before the model compiles
    if refused:
        args += ["--image", str(folder / r.choice(["junk.png", "missing.jpg", "sub"]))]
    before = digest(folder, CHELSEA)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MLX_PALIGEMMA_DEBUG", None)
    # What a command line can hold: no NUL, surrogates only as the escapes of undecodable bytes.
    args = [a.replace("\0", "?").encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
            if _encodable(a) else a.encode("utf-8", "replace").decode().replace("\0", "?") for a in args]
    done = subprocess.run([sys.executable, "-m", "mlx_paligemma.generate", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    check_cli(done.returncode, done.stderr, f"generate {args}")
    if refused:
        assert done.returncode == 1
    elif done.returncode == 0:  # the command line as drawn ran through: it printed its answer
        assert done.stdout.strip(), f"generate {args}: nothing on stdout"
    after = digest(folder, CHELSEA)
    drawn = [str(folder / a[len("--draw="):]) for a in args if a.startswith("--draw=")]
    assert {k: v for k, v in after.items() if k in before and k not in drawn} == \
        {k: v for k, v in before.items() if k not in drawn}


# -- what this suite once found (since fixed): kept as cases of their own ----------------------------------------

def run_generate(args, capsys) -> tuple:
    from mlx_paligemma.generate import main

    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("option", ["--max-tokens=abc", "--top-k=1.5", "--kv-bits=3", "--temperature=x", "--bogus"])
def test_argparse_errors_are_one_line(option, capsys):
    rc, err = run_generate(["--model", str(FIXTURES / "paligemma-tiny"), "--image", str(CHELSEA),
                            "--prompt", "caption en", option], capsys)
    check_cli(rc, err, option)


def test_seed_beyond_64_bits(capsys):
    args = ["--model", str(FIXTURES / "paligemma-tiny"), "--image", str(CHELSEA), "--prompt", "caption en",
            "--max-tokens=1", "--temperature=1", f"--seed={2 ** 64}"]
    rc, err = run_generate(args, capsys)
    check_cli(rc, err, " ".join(args))


def test_draw_over_the_input_image(tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(CHELSEA.read_bytes())  # a JPEG under a .png name: the drawing cannot come out the same bytes
    before = digest(image)
    rc, err = run_generate(["--model", str(FIXTURES / "paligemma-tiny"), "--image", str(image), "--prompt",
                            "caption en", "--max-tokens=1", "--draw", str(image)], capsys)
    assert digest(image) == before
    check_cli(rc, err, "--draw onto --image")
    assert "would overwrite the input image" in err


def test_draw_name_too_long(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(FIXTURES / "paligemma-tiny"), "--image", str(CHELSEA), "--prompt", "caption en",
            "--max-tokens=1", "--draw", "x" * 300 + ".png"]
    rc, err = run_generate(args, capsys)
    check_cli(rc, err, " ".join(args))
