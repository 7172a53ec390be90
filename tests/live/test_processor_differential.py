"""Our processor against transformers' PaliGemmaProcessor on the same random inputs, bit for bit.

Seeded cases on each test checkpoint, and on a copy of PaliGemma 1's folder that has only `tokenizer.model`:
batches of 1-4 prompts with 0-3 images each, in every PIL mode and sizes from 1x1, some given as files (with EXIF
orientations); `<image>` markers written or not; suffixes with `<loc>` and `<seg>` tokens; unicode, control
characters and special tokens written in the text; and broken inputs. Every case knows what it means: transformers
gets the input as given where it accepts that form, and the explicit form (a list of images per prompt, markers
written, wide images as we document reading them) where only we accept it. Outputs must be equal bit for bit;
where the input is broken, both must refuse for that reason: ours with one InputError line of the kind the break
calls for, transformers with the exception its 5.24 code raises for it (REFUSALS). Any other exception on either
side, or a refusal of a valid case, fails the case.
"""

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers import AutoProcessor

import mlx_paligemma as mp
from conftest import FIXTURES

transformers.logging.set_verbosity_error()  # it warns on every prompt without <image>

N_CASES = 400
SIZES = [1, 2, 3, 5, 14, 55, 56, 57, 90]
MODES = ["1", "L", "L+transparency", "P", "P+transparency", "PA", "RGB", "RGB+transparency", "RGBA", "RGBa", "RGBX",
         "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]
WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # transformers clips these to 0..255; we scale them
FILE_MODES = ["RGB", "L", "P", "1", "CMYK"]  # files transformers reads as we do (it drops transparency of files)
PIECES = ["caption en", "describe en", "ocr", "answer en what is in the cup?", "detect cat ; dog", "segment cat",
          "caption es", "question en a cat", "", " ", "  ", "\n", "\t", "\r\n", "a  b", "<bos>", "<eos>", "<pad>",
          "<unk>", "<mask>", "<loc0000>", "<loc0512>", "<loc1023>", "<seg000>", "<seg127>", "<loc1024>", "<seg128>",
          "<image", "image>", "é", "e\u0301", "ﬁ", "日本語のテキスト", "🐱‍👤", "مرحبا بالعالم", "\u200b", "\x00", "\ufeff",
          "Ω≈ç√∫", "Caption EN: A Cat, A Cup. (2024)", "the price is 3.50 dollars", "x" * 40]
SUFFIXES = ["a cat", "<loc0064><loc0400><loc0860><loc0900> cat",
            "<loc0001><loc0002><loc0003><loc0004> cat ; <loc0100><loc0200><loc0300><loc0400> dog",
            "<loc0010><loc0020><loc0900><loc1000><seg001><seg127><seg064><seg000> cat", "", " ", "日本語 🐱", "<eos>",
            "<bos> x", "a\nb", "e\u0301", "<unk>"]

# How each break is refused: (our message, transformers' exception type, its message), as regular expressions
# searched in the message. transformers' IndexError and TypeErrors are what its code raises on these inputs (it
# indexes an empty list; its tokenizer rejects the non-str): known, not a reason to accept any exception.
MARKERS_AND_IMAGES = (r"<image> markers but \d+ images were given|^PaliGemma needs images: got an empty list$",
                      ValueError, r"total number of <image> tokens in the prompts should be the same as the number "
                                  r"of images")
REFUSALS = {
    "marker in suffix": (r"^suffix \d+ .* contains <image>: images go in the prompt$", ValueError,
                         r"Mismatch in `image` token count between text and `input_ids`"),
    "lone surrogate in text": (r"^prompt \d+ is not valid text: lone surrogate '\\ud83d' at character \d+$",
                               TypeError, r"^TextInputSequence must be str$"),
    "lone surrogate in suffix": (r"^suffix \d+ is not valid text: lone surrogate '\\ud83d' at character \d+$",
                                 TypeError, r"^TextInputSequence must be str$"),
    "suffix count": (r"^got \d+ suffixes for \d+ prompts$", ValueError,
                     r"batch length of `text`: \d+ does not match batch length of `text_pair`: \d+"),
    "empty": (r"^no prompts: text is an empty list$", IndexError, r"^list index out of range$"),
    "empty list of images": (r"^PaliGemma needs images: got an empty list$", IndexError, r"^list index out of range$"),
    "no images": (r"^PaliGemma needs images: got none$", ValueError,
                  r"`images` are expected as arguments to a `PaliGemmaProcessor` instance|"
                  r"<image> tokens in the text but no images were passed"),
    "no prompts": (r"^no prompts: text is an empty list$", ValueError,
                   r"total number of <image> tokens in the prompts should be the same|"
                   r"Received \d+ images for 0 prompts"),
    "text of another type": (r"^text must be a string or a list of strings$", TypeError,
                             r"^argument of type '(int|NoneType)' is not iterable$"),
    "extra image": MARKERS_AND_IMAGES,
    "missing image": MARKERS_AND_IMAGES,
    "image moved to another prompt": (r"^prompt \d+ has \d+ <image> markers but \d+ images were given$", None, None),
    "flat list of another length": (r"^got \d+ images for \d+ prompts without <image> markers: ", ValueError,
                                    r"^Received \d+ images for \d+ prompts\. Each prompt should be associated"),
}


@pytest.fixture(scope="module", params=["paligemma-tiny", "paligemma2-tiny", "paligemma-tiny/tokenizer.model"])
def processors(request, tmp_path_factory):
    name, _, only_model = request.param.partition("/")
    folder = FIXTURES / name
    if only_model:  # some hub folders ship only the sentencepiece file
        folder = shutil.copytree(folder, tmp_path_factory.mktemp("sentencepiece") / name)
        (folder / "tokenizer.json").unlink()
    return mp.PaliGemmaProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def random_image(rng, mode):
    w, h = int(rng.choice(SIZES)), int(rng.choice(SIZES))
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if rng.random() < 0.5:  # smooth content too, where resampling rounds differently than on noise
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x * 7 + y, y * 5 + 3 * x, (x * y) % 256], -1).astype(np.uint8)
    image = Image.fromarray(rgb)
    mode, _, transparency = mode.partition("+")
    if mode == "F":
        values = rng.uniform(-0.2, 1.2, (h, w)).astype(np.float32)
        values[rng.random((h, w)) < 0.05] = np.nan
        return Image.frombytes("F", (w, h), values.tobytes())
    if mode == "I":
        return Image.frombytes("I", (w, h), rng.integers(-1000, 70000, (h, w)).astype(np.int32).tobytes())
    if mode.startswith("I;16"):
        values = rng.integers(0, 65536, (h, w))
        return Image.frombytes(mode, (w, h), values.astype(">u2" if mode == "I;16B" else "=u2").tobytes())
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        alpha = rng.integers(0, 256, (h, w))
        alpha[:, : w // 3] = 0  # a fully transparent band and an opaque one
        alpha[:, -(w // 3):] = 255
        image = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8))
        if mode == "PA":
            image = image.convert("RGB").quantize(16)
            image.putalpha(Image.fromarray(alpha.astype(np.uint8)))
            return image
        return image.convert(mode) if mode != "La" else image.convert("LA").convert("La")
    image = image.quantize(int(rng.choice([2, 16, 256]))) if mode == "P" and rng.random() < 0.5 else image.convert(mode)
    if transparency:
        image.info["transparency"] = image.getpixel((0, 0))  # at least one pixel is transparent
    return image


def random_file(rng, folder: Path, mode):
    image = random_image(rng, mode)
    if mode == "CMYK" or (mode in ("RGB", "L") and rng.random() < 0.7):
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(1, 9))  # orientation: transformers and we both turn the image upright
        path = folder / f"{rng.integers(1 << 62)}.jpg"
        image.save(path, exif=exif)
    else:
        path = folder / f"{rng.integers(1 << 62)}.png"
        image.save(path)
    return path if rng.random() < 0.3 else str(path)  # transformers takes only str


def as_documented(image):
    """What transformers must be given to mean what we read: wide images scaled to 8 bits, La through LA."""
    if isinstance(image, Path):
        return str(image)
    if not isinstance(image, Image.Image) or image.mode not in WIDE + ("La",):
        return image
    if image.mode == "La":
        return image.convert("LA")
    values = np.asarray(image, np.float64)
    values = np.clip(np.nan_to_num(values), 0, 1) * 255 if image.mode == "F" else np.clip(values, 0, 65535) / 257
    return Image.fromarray(np.round(values).astype(np.uint8))


def random_text(rng, pieces, most=3):
    chosen = [pieces[i] for i in rng.integers(0, len(pieces), int(rng.integers(0, most + 1)))]
    return str(rng.choice(["", " "])).join(chosen)


def with_markers(rng, prompt, n):
    if rng.random() < 0.5:
        return "<image>" * n + prompt
    # Anywhere, even inside a word or a special token: bos goes after the last one.
    for at in sorted(rng.integers(0, len(prompt) + 1, n), reverse=True):
        prompt = prompt[:at] + "<image>" + prompt[at:]
    return prompt if prompt.count("<image>") == n else with_markers(rng, prompt.replace("<image>", ""), n)


def make_case(seed, folder: Path):
    """(description, what we get, what transformers gets, expectation, break): expectation 'same', 'refused' or
    'we refuse'; break a key of REFUSALS or None."""
    rng = np.random.default_rng([20240515, seed])
    n = int(rng.choice([1, 1, 2, 3, 4]))
    markers = str(rng.choice(["none", "written", "mixed"], p=[0.45, 0.4, 0.15] if n > 1 else [0.5, 0.5, 0]))
    modes = MODES if rng.random() < 0.3 else [m for m in MODES if m not in WIDE + ("La",)]
    counts = [int(rng.choice([1, 1, 1, 2, 3])) for _ in range(n)]
    if markers == "none" and n > 1 and rng.random() < 0.15:
        # A prompt without image beside others with images (transformers fails on an empty first list).
        counts[int(rng.integers(1, n))] = 0
    if markers == "written":
        written = [True] * n
    elif markers == "mixed":
        written = [bool(i == 0) or bool(rng.random() < 0.5) for i in range(n)]
        written[-1] = False
    else:
        written = [False] * n

    def image():
        if rng.random() < 0.15:
            return random_file(rng, folder, str(rng.choice(FILE_MODES)))
        return random_image(rng, str(rng.choice(modes)))

    images = [[image() for _ in range(c)] for c in counts]
    prompts = [random_text(rng, PIECES) for _ in range(n)]
    texts = [with_markers(rng, p, c) if w else p for p, c, w in zip(prompts, counts, written)]
    suffix = [random_text(rng, SUFFIXES, 2) for _ in range(n)] if rng.random() < 0.4 else None
    # The explicit form: a list per prompt, markers written in every prompt once any prompt has them.
    explicit = dict(images=[[as_documented(i) for i in row] for row in images],
                    text=texts if markers == "none" else ["<image>" * c + p if not w else t
                                                          for p, t, c, w in zip(prompts, texts, counts, written)],
                    suffix=suffix)
    lenient = markers == "mixed" or any(as_documented(i) is not i for row in images for i in row)

    # The image forms transformers has besides a list per prompt, and ours beyond them.
    given = dict(images=images, text=texts, suffix=suffix)
    forms = ["nested"]
    if markers == "written" or (markers == "none" and set(counts) == {1}):
        forms.append("flat")
    if set(counts) == {1}:
        forms.append("one image")
    if n == 1 and markers == "none" and counts[0] > 1:
        forms.append("flat for one prompt")
    form = str(rng.choice(forms))
    if form == "flat":
        given["images"] = [i for row in images for i in row]
    elif form == "one image":
        given["images"] = images[0][0]
        explicit["images"] = [[as_documented(images[0][0])]] * n
        lenient |= n > 1
    elif form == "flat for one prompt":
        given["images"] = images[0]
        lenient = True
    elif rng.random() < 0.2:
        given["images"] = tuple(tuple(row) for row in images)
    if n == 1 and rng.random() < 0.3:
        given["text"], given["suffix"] = texts[0], suffix[0] if suffix else None
    if n == 1 and texts[0] == "" and rng.random() < 0.5:
        given["text"] = None  # ours: the empty prompt; transformers: no input_ids at all
        lenient = True

    expect, broken = "same", None
    if not lenient and rng.random() < 0.5:  # a form transformers takes, so that it refuses for the same reason
        broken, expect = break_case(rng, given, explicit, images, counts, written, markers, form, n)
    description = (f"case {seed}: {n} prompts, images {counts} as {form}, markers {markers}, "
                   f"modes {[getattr(i, 'mode', 'file') for row in images for i in row]}, broken {broken}, "
                   f"text {given['text']!r}, suffix {given['suffix']!r}")
    return description, given, explicit if lenient else given, expect, broken


def break_case(rng, given, explicit, images, counts, written, markers, form, n):
    """Turn a case into an input both processors must refuse, or one we refuse and transformers does not."""
    extra = random_image(rng, "RGB")
    choices = ["marker in suffix", "lone surrogate in text", "lone surrogate in suffix", "suffix count", "empty",
               "empty list of images", "no images", "no prompts", "text of another type"]
    counting = []  # the rarer chances to get the number of images wrong are taken most of the time
    if markers == "written" and form in ("nested", "flat"):
        counting += ["extra image", "missing image"]
    if markers == "written" and form == "nested" and n > 1 and max(counts) > 1:
        counting += ["image moved to another prompt"] * 3  # the rarest chance of all
    if markers == "none" and form == "flat" and n > 1:
        counting.append("flat list of another length")
    broken = str(rng.choice(counting if counting and rng.random() < 0.75 else choices))
    row = int(rng.integers(n))
    text, suffix = given["text"], given["suffix"]
    texts = list(text) if isinstance(text, list) else [text or ""]
    suffixes = [""] * n if suffix is None else [suffix] if isinstance(suffix, str) else list(suffix)
    if broken == "marker in suffix":
        suffixes[row] += " <image> a cat"
        given["suffix"] = suffixes
        given["text"] = texts
    elif broken.startswith("lone surrogate"):
        target = texts if broken.endswith("text") else suffixes
        target[row] = target[row][: len(target[row]) // 2] + "\ud83d" + target[row][len(target[row]) // 2:]
        given["text"], given["suffix"] = texts, suffixes
    elif broken == "suffix count":
        given["text"], given["suffix"] = texts, suffixes + ["a cat"]
    elif broken == "empty":
        given["images"], given["text"], given["suffix"] = [], [], None
    elif broken == "empty list of images":
        given["images"], given["text"] = [[]], ["caption en"]
    elif broken == "no images":
        given["images"] = None
    elif broken == "no prompts":
        given["text"], given["suffix"] = [], None
    elif broken == "text of another type":
        given["text"] = [1] if rng.random() < 0.5 else [None] + texts[1:]
    elif broken == "extra image":
        nested = [list(r) for r in images]
        nested[row].append(extra)
        given["images"] = nested if form == "nested" else [i for r in nested for i in r]
    elif broken == "missing image":
        nested = [list(r) for r in images]
        nested[row].pop()
        given["images"] = nested if form == "nested" else [i for r in nested for i in r]
    elif broken == "image moved to another prompt":
        nested = [list(r) for r in images]
        source = int(np.argmax(counts))
        nested[(source + 1) % n].append(nested[source].pop())
        given["images"] = nested
        # transformers reads only the total number of markers and fills them in order; the lists say otherwise.
        return broken, "we refuse"
    elif broken == "flat list of another length":
        flat = list(given["images"])
        given["images"] = flat + [extra] if rng.random() < 0.5 or len(flat) < 2 else flat[:-1]
    return broken, "refused"


def ours(processor, inputs):
    try:
        batch = processor(**inputs)
    except Exception as e:  # judged in problems(): only an InputError of the expected kind is a refusal
        return e
    return {k: np.array(v) for k, v in batch.items()}


def theirs(processor, inputs):
    try:
        batch = processor(**inputs, padding="longest", return_tensors="np")
    except Exception as e:  # judged in problems() against the exception transformers raises for the break
        return e
    out = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["pixel_values"] = np.asarray(batch["pixel_values"]).transpose(0, 2, 3, 1)  # ours are channels last
    if inputs.get("suffix") is not None:
        out["labels"] = np.asarray(batch["labels"])
    return out


def shown(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]!r}"


def problems(expect, broken, a, b):
    """What is wrong with our result `a` and transformers' `b` (None where it was not run) for this case."""
    if expect == "same":
        wrong = [f"{side} refused ({shown(r)})" for side, r in (("ours", a), ("transformers", b))
                 if isinstance(r, Exception)]
        if wrong:
            return wrong
        return [f"{k} differ" for k in b if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])] + \
            [f"extra {k}" for k in a.keys() - b.keys()]
    ours_message, their_type, their_message = REFUSALS[broken]
    wrong = []
    if not isinstance(a, Exception):
        wrong.append("ours accepted")
    elif not (isinstance(a, mp.InputError) and "\n" not in str(a) and re.search(ours_message, str(a))):
        wrong.append(f"ours refused not as expected ({shown(a)})")
    if expect == "refused":
        if not isinstance(b, Exception):
            wrong.append("transformers accepted")
        elif not (isinstance(b, their_type) and re.search(their_message, str(b))):
            wrong.append(f"transformers refused not as expected ({shown(b)})")
    return wrong


def test_processor_matches_transformers_on_random_inputs(processors, tmp_path):
    our_processor, their_processor = processors
    failures, seen, breaks = [], Counter(), Counter()
    for seed in range(N_CASES):
        description, given, explicit, expect, broken = make_case(seed, tmp_path)
        seen.update([expect] + ["explicit form"] * (explicit is not given))
        breaks.update([broken] * (broken is not None))
        a = ours(our_processor, given)
        b = None if expect == "we refuse" else theirs(their_processor, explicit)
        wrong = problems(expect, broken, a, b)
        if wrong:
            failures.append(f"{description}: {', '.join(wrong)}")
    assert not failures, f"{len(failures)} of {N_CASES} cases differ:\n" + "\n".join(failures[:15])
    assert min(seen[k] for k in ("same", "explicit form", "refused", "we refuse")) >= 3, seen  # every kind is exercised
    assert set(breaks) == set(REFUSALS), set(REFUSALS) - set(breaks)  # and every break


def test_refusals_are_judged_by_kind():
    # The judge itself: a refusal of another kind, on either side, is a failure, as is any refusal of a valid case.
    same = {"input_ids": np.zeros(2)}
    assert problems("same", None, same, dict(same)) == []
    assert problems("same", None, mp.InputError("x"), ValueError("y")) == ["ours refused (InputError: 'x')",
                                                                          "transformers refused (ValueError: 'y')"]
    right = mp.InputError("got 3 suffixes for 2 prompts")
    theirs_right = ValueError("batch length of `text`: 2 does not match batch length of `text_pair`: 3.")
    assert problems("refused", "suffix count", right, theirs_right) == []
    assert problems("refused", "suffix count", mp.InputError("PaliGemma needs images: got none"), theirs_right)
    assert problems("refused", "suffix count", RuntimeError("got 3 suffixes for 2 prompts"), theirs_right)
    assert problems("refused", "suffix count", right, TypeError("batch length of `text`: 2 does not match batch "
                                                                "length of `text_pair`: 3."))
    assert problems("refused", "suffix count", right, ValueError("something else"))
    assert problems("refused", "suffix count", right, same) == ["transformers accepted"]
    assert problems("we refuse", "image moved to another prompt",
                    mp.InputError("prompt 0 has 2 <image> markers but 1 images were given"), None) == []
