"""Bad input gets one clear line that names the problem."""

import json
import os
import shutil

import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES

MODEL = FIXTURES / "paligemma-tiny"


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def model_copy(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(MODEL, out)
    return out


@pytest.fixture(scope="module")
def processor():
    return mp.load(str(MODEL))[1]


def test_missing_image(processor, tmp_path):
    with pytest.raises(mp.InputError) as e:
        processor(images=str(tmp_path / "nope.jpg"), text="caption en")
    assert "image not found" in one_line(e)


def test_corrupt_image(processor, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a picture" * 10)
    with pytest.raises(mp.InputError) as e:
        processor(images=str(bad), text="caption en")
    assert "cannot read image" in one_line(e) and "bad.jpg" in one_line(e)


def test_truncated_image(processor, tmp_path):
    data = (FIXTURES / "images" / "chelsea.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(mp.InputError) as e:
        processor(images=str(cut), text="caption en")
    assert "cut.jpg" in one_line(e) and "truncated" in one_line(e)


def test_wrong_number_of_images(processor):
    image = Image.new("RGB", (20, 20))
    with pytest.raises(mp.InputError) as e:
        processor(images=[[image]], text=["<image><image>caption en"])
    assert "2 <image> markers but 1 images" in one_line(e)
    with pytest.raises(mp.InputError):
        processor(images=[image, image, image], text=["a", "b"])


def test_prompt_too_long(processor):
    with pytest.raises(mp.InputError) as e:
        processor(images=Image.new("RGB", (20, 20)), text="cat " * 10000)
    assert "tokens long" in one_line(e)


def test_folder_without_config(tmp_path):
    with pytest.raises(mp.InputError) as e:
        mp.load(str(tmp_path))
    assert "no config.json" in one_line(e)


def test_unknown_model_folder(tmp_path):
    with pytest.raises(mp.InputError) as e:
        mp.load(str(tmp_path / "does-not-exist"))
    assert "model folder not found" in one_line(e)


def test_truncated_weights(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert "truncated" in one_line(e) and "model.safetensors" in one_line(e)


def test_config_that_does_not_match_the_weights(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert "do not match its config.json" in one_line(e)


def test_unknown_model_type(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "llava"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert "unknown model type 'llava'" in one_line(e)


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--max-tokens", "-5"], "max_tokens must be an integer >= 1"),
    (["--temperature", "-1"], "temperature must be 0 (greedy) or at least 1e-4"),
    (["--temperature", "1e-320"], "temperature must be 0 (greedy) or at least 1e-4"),
    (["--seed", "18446744073709551616", "--temperature", "1"], "seed must be below 2**64"),
    (["--max-tokens", "abc"], "argument --max-tokens: invalid int value"),
    (["--kv-bits", "3"], "argument --kv-bits: invalid choice"),
    (["--draw", "x" * 300 + ".png"], "File name too long"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be an integer >= 0"),
    (["--draw", "out"], "--draw out: give an image file name"),
    (["--draw", "missing/out.png"], "folder missing does not exist"),
    (["--mask-decoder", "nowhere.npz"], "--mask-decoder nowhere.npz: no such file"),
    (["--kv-bits", "8"], "kv_bits needs a head size divisible by 32; this model's is 16"),
])
def test_cli_arguments_are_checked_with_one_line(args, message, capsys, monkeypatch, tmp_path):
    from mlx_paligemma.generate import main

    monkeypatch.chdir(tmp_path)
    rc = main(["--model", str(MODEL), "--image", str(FIXTURES / "images" / "chelsea.jpg"), "--prompt", "caption en",
               *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_damaged_mask_decoder_is_one_line(tmp_path, content):
    from mlx_paligemma.formats.mask_decoder import load_mask_decoder

    for name in ("vae.npz", "vae.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(mp.InputError) as e:
            load_mask_decoder(tmp_path / name)
        assert "cannot load the mask decoder" in one_line(e)


# Found by tests/test_fuzz.py.

@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_json_nested_too_deeply_is_one_line(model_copy, name):
    (model_copy / name).write_bytes(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert name in one_line(e) and "nested too deeply" in one_line(e)


def test_config_without_the_tokenizers_image_token(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    del config["image_token_index"]  # the default, 257152, is not this tokenizer's <image>: generate raised ValueError
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert "the tokenizer's <image> token is 1536, config.json's image_token_index is 257152" in one_line(e)


@pytest.mark.parametrize("key, value, message", [
    ("image_seq_length", 10 ** 9, "images of 56 px in 1000000000 tokens"),  # was a MemoryError after minutes
    ("size", {"height": 28, "width": 28}, "images of 28 px in 16 tokens"),  # was a ValueError inside the model
])
def test_processor_settings_that_do_not_match_the_model(model_copy, key, value, message):
    settings = json.loads((model_copy / "preprocessor_config.json").read_text())
    settings[key] = value
    (model_copy / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(mp.InputError) as e:
        mp.load(str(model_copy))
    assert f"preprocessor_config.json: {message}, but config.json's vision model takes 56 px in 16 tokens" \
        in one_line(e)


def test_image_name_with_a_newline_is_one_line(tmp_path):
    with pytest.raises(mp.InputError) as e:
        mp.load_image(tmp_path / "a\nb.png")
    assert "a\\nb.png" in one_line(e)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_image_files_are_closed(tmp_path):
    def open_files():
        names = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # listdir's own descriptor, closed by now
                pass
        return names

    full, cut = tmp_path / "full.gif", tmp_path / "cut.gif"
    Image.new("RGB", (64, 64), "red").save(full)
    cut.write_bytes(full.read_bytes()[:-20])
    image = mp.load_image(full)  # PIL keeps a GIF's file open for its other frames: ours is read and closed
    with pytest.raises(mp.InputError):
        mp.load_image(cut)
    assert image.size == (64, 64) and not {str(full), str(cut)} & open_files()


@pytest.mark.parametrize("line, message", [
    (b'{"image": "a.png", "prefix": "caption en", "suffix": "caf\xe9"}', "train.jsonl, line 2: not UTF-8 text"),
    (b"[" * 100000, "train.jsonl, line 2: not valid JSON: nested too deeply"),
    (b'{"image": "a.png", "prefix": "\\ud800", "suffix": "x"}', "line 2: prefix is not valid text: lone surrogate"),
    (b'{"image": "a.png", "prefix": "x", "suffix": ["y", "\\udfff"]}', "line 2: suffix is not valid text"),
    (b'{"image": "a\\u0000.png", "prefix": "x", "suffix": "y"}', "line 2: image 'a\\x00.png' is not a usable path"),
    (b'{"image": "\\udc00.png", "prefix": "x", "suffix": "y"}', "line 2: image '\\udc00.png' is not a usable path"),
])
def test_bad_jsonl_lines_are_one_line(tmp_path, line, message):
    from mlx_paligemma.data.items import read_jsonl

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    file = tmp_path / "train.jsonl"
    file.write_bytes(b'{"image": "a.png", "prefix": "caption en", "suffix": "a cat"}\n' + line + b"\n")
    with pytest.raises(mp.InputError) as e:
        read_jsonl(file)
    assert message in one_line(e)


@pytest.mark.parametrize("module", ["generate", "convert", "export", "lora", "evaluate", "batch", "server"])
def test_every_command_line_reports_a_bad_option_in_one_line(module):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", f"mlx_paligemma.{module}", "--no-such-option"], capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
