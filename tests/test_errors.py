"""Bad input gets one clear line that names the problem."""

import json
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
    (["--temperature", "-1"], "temperature must be >= 0"),
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
    rc = main(["--model", str(MODEL), "--image", str(FIXTURES / "images" / "chelsea.jpg"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_damaged_mask_decoder_is_one_line(tmp_path, content):
    from mlx_paligemma.mask_decoder import load_mask_decoder

    for name in ("vae.npz", "vae.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(mp.InputError) as e:
            load_mask_decoder(tmp_path / name)
        assert "cannot load the mask decoder" in one_line(e)
