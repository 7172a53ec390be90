"""The processor's input forms, images of every kind and its files: what it accepts means what transformers' explicit
form means, and what it refuses gets one line. (tests/live compares it with transformers itself.)"""

import functools
import json
import http.server
import shutil
import threading
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

import mlx_paligemma as mp
import mlx_paligemma.processing.images as images_module
from conftest import FIXTURES


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(mp.InputError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module", params=["paligemma-tiny", "paligemma2-tiny"])
def processor(request):
    return mp.PaliGemmaProcessor.from_pretrained(FIXTURES / request.param)


def arrays(batch):
    return {k: np.array(v) for k, v in batch.items()}


def assert_same(a, b):
    a, b = arrays(a), arrays(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def photo(w=20, h=10, seed=0):
    """An image that looks different turned or mirrored."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


A, B, C = photo(seed=1), photo(7, 30, seed=2), photo(3, 3, seed=3)


# Forms of images and text (issue 15)

def test_flat_list_fills_the_markers_in_order(processor):
    assert_same(processor(images=[A, B, C], text=["<image>a", "<image><image>b"]),
                processor(images=[[A], [B, C]], text=["<image>a", "<image><image>b"]))
    assert "3 <image> markers but 2 images" in refused(processor, images=[A, B], text=["<image>a", "<image><image>b"])


def test_forms_beyond_transformers_mean_the_explicit_form(processor):
    # One image for every prompt; a flat list for one prompt; a prompt without markers beside one with them.
    assert_same(processor(images=A, text=["a", "b"]), processor(images=[[A], [A]], text=["a", "b"]))
    assert_same(processor(images=[A, B], text="a"), processor(images=[[A, B]], text=["a"]))
    assert_same(processor(images=[[A], [B, C]], text=["<image>a", "b"]),
                processor(images=[[A], [B, C]], text=["<image>a", "<image><image>b"]))
    assert_same(processor(images=A), processor(images=A, text=""))


def test_a_prompt_without_image(processor):
    # An empty list is a prompt without image; first or not, a row is what it is alone.
    batch = arrays(processor(images=[[], [A]], text=["caption en", "ocr"]))
    swapped = arrays(processor(images=[[A], []], text=["ocr", "caption en"]))
    alone = arrays(processor(images=[[A]], text=["ocr"]))
    np.testing.assert_array_equal(batch["pixel_values"], alone["pixel_values"])
    assert batch["input_ids"][1].tolist() == swapped["input_ids"][0].tolist() == alone["input_ids"][0].tolist()
    text_only = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert text_only == swapped["input_ids"][1][swapped["attention_mask"][1] == 1].tolist()
    assert processor.tokenizer.image_id not in text_only and text_only[0] == processor.tokenizer.bos_id


def test_markers_must_match_the_images_of_their_prompt(processor):
    # transformers fills markers in order whatever the lists say; a list of lists that disagrees is a mistake.
    message = refused(processor, images=[[A, B], [C]], text=["<image>a", "<image><image>b"])
    assert "prompt 0 has 1 <image> markers but 2 images" in message


def test_image_marker_in_a_suffix(processor):
    message = refused(processor, images=A, text="caption en", suffix="<image> a cat")
    assert "suffix 0" in message and "'<image> a cat'" in message


@pytest.mark.parametrize("images, text, expected", [
    ([], [], "no prompts"),
    (A, [], "no prompts"),
    ([[]], ["caption en"], "needs images"),
    ([], "caption en", "needs images"),
    (None, "caption en", "needs images"),
    ([A, [B]], ["a", "b"], "not a mix"),
    ([A, B, C], ["a", "b"], "3 images for 2 prompts"),
    (A, [None], "text must be"),
    (A, 3, "text must be"),
    (3, "a", "not int"),
    (np.zeros((4, 4, 3), np.uint8), "a", "not ndarray"),
])
def test_empty_or_wrong_inputs(processor, images, text, expected):
    assert expected in refused(processor, images=images, text=text)


def test_lone_surrogates(processor):
    assert "prompt 1 is not valid text" in refused(processor, images=A, text=["a", "caption \ud800 en"])
    assert "suffix 0 is not valid text" in refused(processor, images=A, text="a", suffix="a \udc00")
    assert "suffix must be" in refused(processor, images=A, text="a", suffix=[None])


# Images (issue 10)

def pixels(processor, image):
    return np.array(processor(images=image, text="a")["pixel_values"])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_files_upright(processor, tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    A.save(tmp_path / "a.png", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "a.png"))
    assert np.array_equal(np.asarray(mp.load_image(tmp_path / "a.png")), np.asarray(upright))
    assert (upright.size == A.size) == (orientation <= 4)
    np.testing.assert_array_equal(pixels(processor, str(tmp_path / "a.png")), pixels(processor, upright))
    # A PIL image is used as given, as transformers' processor does.
    opened = Image.open(tmp_path / "a.png")
    assert mp.load_image(opened) is opened and opened.size == A.size


def test_exif_orientation_turns_urls_upright(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PALIGEMMA_ALLOW_PRIVATE_URLS", "1")  # 127.0.0.1 is refused by default (fetch.py)
    exif = Image.Exif()
    exif[0x0112] = 6
    A.save(tmp_path / "a.jpg", exif=exif)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = mp.load_image(f"http://127.0.0.1:{server.server_port}/a.jpg")
    finally:
        server.shutdown()
        server.server_close()
    assert image.size == (A.height, A.width)
    assert np.array_equal(np.asarray(image), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.jpg"))))


def uniform(mode, value, size=(5, 4)):
    dtype = {"L": "u1", "I": "=i4", "F": "=f4", "I;16B": ">u2"}.get(mode, "=u2")
    return Image.frombytes(mode, size, np.full(size[::-1], value, dtype).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
@pytest.mark.parametrize("value, gray", [(0, 0), (257, 1), (32896, 128), (65535, 255), (30000, 117)])
def test_wide_integer_images_are_read_as_16_bit(processor, mode, value, gray):
    # PIL (and so transformers) clips them to 0..255: almost every 16-bit photo turns white. We divide by 257.
    np.testing.assert_array_equal(pixels(processor, uniform(mode, value)), pixels(processor, uniform("L", gray)))


@pytest.mark.parametrize("mode, value, gray", [("I", -5, 0), ("I", 70000, 255), ("F", 0.5, 128), ("F", 1.0, 255),
                                               ("F", -0.3, 0), ("F", 7.0, 255), ("F", np.nan, 0)])
def test_out_of_range_and_float_images(processor, mode, value, gray):
    np.testing.assert_array_equal(pixels(processor, uniform(mode, value)), pixels(processor, uniform("L", gray)))


def test_every_pil_mode(processor):
    base = photo(9, 7)
    for mode in Image.MODES:
        if mode in ("I", "F") or mode.startswith("I;16"):
            image = Image.frombytes(mode, base.size, np.asarray(base.convert("L"), {"I": "=i4", "F": "=f4",
                                    "I;16B": ">u2"}.get(mode, "=u2")).tobytes())
        else:
            image = base.convert("RGBA").convert(mode) if mode in ("La", "RGBa", "PA") else base.convert(mode)
        values = pixels(processor, image)
        assert values.shape == (1, processor.image_size, processor.image_size, 3), mode
        assert np.isfinite(values).all() and values.min() >= -1 and values.max() <= 1, mode


def test_premultiplied_and_transparent_images_are_composited_on_white(processor):
    la = Image.merge("LA", [Image.new("L", (4, 4), 90), Image.new("L", (4, 4), 0)])
    white = pixels(processor, Image.new("RGB", (4, 4), (255, 255, 255)))
    np.testing.assert_array_equal(pixels(processor, la), white)
    # La: PIL cannot convert it to RGB and transformers refuses it; it goes through LA.
    half = Image.merge("LA", [Image.new("L", (4, 4), 200), Image.new("L", (4, 4), 128)])
    premultiplied = half.convert("La")
    np.testing.assert_array_equal(pixels(processor, premultiplied), pixels(processor, premultiplied.convert("LA")))


def test_a_file_gives_the_pixels_of_the_image_opened_from_it(processor, tmp_path):
    rgba = Image.fromarray(np.random.default_rng(4).integers(0, 256, (9, 13, 4), dtype=np.uint8))
    rgba.save(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels(processor, str(tmp_path / "a.png")), pixels(processor, rgba))


def test_pixel_limit(monkeypatch, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 399)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not PIL's two-line warning
        assert "20x20 pixels, more than the limit of 399" in refused(mp.load_image, tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # beyond PIL's limit: PIL warns, we refuse
        assert "more than the limit of 399" in refused(mp.load_image, tmp_path / "big.png")
        monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 10**9)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # beyond twice PIL's limit: PIL refuses before we look
        assert "too large: more than 200 pixels" in refused(mp.load_image, tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
        assert mp.load_image(tmp_path / "big.png").size == (20, 20)


def test_folder_given_as_the_image(tmp_path):
    assert refused(mp.load_image, tmp_path) == f"{tmp_path} is a folder, not an image"


# Processor files (issue 10)

@pytest.fixture(params=["paligemma-tiny", "paligemma2-tiny"])
def folder(request, tmp_path):
    return shutil.copytree(FIXTURES / request.param, tmp_path / request.param)


def settings_file(folder):
    newer = folder / "processor_config.json"
    return newer if newer.exists() else folder / "preprocessor_config.json"


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "is not valid JSON"),
    (b'["a list"]', "is not a JSON object"),
    (b'{"image_seq_length": "\xe9"}', "is not UTF-8 text"),
])
def test_broken_processor_file(folder, content, expected):
    file = settings_file(folder)
    file.write_bytes(content)
    message = refused(mp.PaliGemmaProcessor.from_pretrained, folder)
    assert str(file) in message and expected in message


@pytest.mark.parametrize("key, value", [("image_seq_length", "16"), ("image_seq_length", True), ("size", 56),
                                        ("size", {"height": "56"}), ("size", {"height": 56, "width": 64}),
                                        ("image_mean", "0.5"), ("image_std", [0.5, 0.5]), ("rescale_factor", None),
                                        ("rescale_factor", "1/255")])
def test_processor_setting_of_the_wrong_type(folder, key, value):
    file = settings_file(folder)
    data = json.loads(file.read_text())
    settings = data.get("image_processor", data)
    settings[key] = value
    file.write_text(json.dumps(data))
    if value is None:  # null is as good as absent
        assert mp.PaliGemmaProcessor.from_pretrained(folder).rescale_factor == 1 / 255
        return
    message = refused(mp.PaliGemmaProcessor.from_pretrained, folder)
    assert message.startswith(f"{file}: '{key}' must be")


def test_image_processor_that_is_not_an_object(tmp_path):
    folder = shutil.copytree(FIXTURES / "paligemma2-tiny", tmp_path / "m")
    (folder / "processor_config.json").write_text('{"image_processor": [1]}')
    assert "'image_processor' must be an object" in refused(mp.PaliGemmaProcessor.from_pretrained, folder)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b'{"model": 1}', b""])
def test_broken_tokenizer_json(folder, content):
    (folder / "tokenizer.json").write_bytes(content)
    assert f"cannot read {folder / 'tokenizer.json'}: " in refused(mp.PaliGemmaProcessor.from_pretrained, folder)


@pytest.mark.parametrize("content", [b"not a sentencepiece model", b"", bytes(range(256)) * 4])
def test_broken_tokenizer_model(tmp_path, content):
    folder = shutil.copytree(FIXTURES / "paligemma-tiny", tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(content)
    assert f"cannot read {folder / 'tokenizer.model'}: " in refused(mp.PaliGemmaProcessor.from_pretrained, folder)


def test_tokenizer_of_another_model(folder):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    assert "has no <pad> token" in refused(mp.PaliGemmaProcessor.from_pretrained, folder)


def test_sentencepiece_file_gives_the_ids_of_tokenizer_json(tmp_path):
    folder = shutil.copytree(FIXTURES / "paligemma-tiny", tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    from_model = mp.PaliGemmaProcessor.from_pretrained(folder)
    from_json = mp.PaliGemmaProcessor.from_pretrained(FIXTURES / "paligemma-tiny")
    for text in ["<unk> a <mask> b", "<loc0001><seg002> é 日本", "<image>x<eos><pad><bos>", "a\x00b  c\n"]:
        assert_same(from_model(images=A, text=text, suffix=text.replace("<image>", "")),
                    from_json(images=A, text=text, suffix=text.replace("<image>", "")))
