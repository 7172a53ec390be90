"""Checkpoint formats: big_vision .npz in (exactly the hub checkpoint's model), atomic writes."""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.convert import convert, main
from mlx_paligemma.formats import big_vision
from mlx_paligemma.formats.atomic import partial_path
from mlx_paligemma.formats.ownership import RECORD
from mlx_paligemma.processing.processor import Tokenizer

PACKAGE = Path(mp.__file__).parent
ROOT = PACKAGE.parent
NPZ = FIXTURES / "big_vision"
PIECES = 1536  # the tiny tokenizer's sentencepiece vocabulary: big_vision's embedding rows


def logits_of(model, processor, case):
    batch = processor(images=images_of(case)[0], text=case["text"][0])
    return np.array(model(batch["input_ids"], batch["pixel_values"]))


def convert_npz(model_name, out, **options):
    # The tiny PaliGemma 2's soft-caps and window are not Gemma 2's published ones: its config.json comes along.
    config = str(FIXTURES / model_name / "config.json") if model_name == "paligemma2-tiny" else None
    return convert(str(NPZ / f"{model_name}.npz"), str(out), tokenizer=str(FIXTURES / model_name), config=config,
                   **options)


def test_big_vision_converts_to_the_hub_checkpoint_exactly(tmp_path, model_name, cases):
    out = convert_npz(model_name, tmp_path / "from-npz", dtype="float32")
    ours, processor = mp.load(str(out), dtype=mx.float32)
    # PaliGemma 2 is published (and here stored) in bfloat16: the hub model rounded the same way.
    stored = mx.bfloat16 if model_name == "paligemma2-tiny" else mx.float32
    hub, _ = mp.load(str(FIXTURES / model_name), dtype=stored)
    hub.set_dtype(mx.float32)
    # The rows past big_vision's vocabulary (<image>, padding) are the mean embedding; transformers' converter
    # draws them at random around it. Everything else is the same weights.
    rows = ours.language_model.model.embed_tokens.weight
    mean = np.array(rows[:PIECES]).mean(axis=0)
    np.testing.assert_allclose(np.array(rows[PIECES:]), np.broadcast_to(mean, rows[PIECES:].shape), atol=1e-5)
    embed = hub.language_model.model.embed_tokens
    embed.weight = mx.concatenate([embed.weight[:PIECES], rows[PIECES:]])
    for case in ("single", "two_images"):
        np.testing.assert_array_equal(logits_of(ours, processor, cases[case]), logits_of(hub, processor, cases[case]))


def test_config_inferred_from_the_shapes(model_name):
    ckpt = big_vision.Checkpoint(NPZ / f"{model_name}.npz")
    inferred = big_vision.infer_config(ckpt, Tokenizer(FIXTURES / model_name))
    hub = json.loads((FIXTURES / model_name / "config.json").read_text())
    for section in ("text_config", "vision_config"):
        for key, value in inferred[section].items():
            if key in hub[section] and key not in ("attn_logit_softcapping", "final_logit_softcapping",
                                                   "sliding_window", "torch_dtype"):
                assert hub[section][key] == value, (section, key)
    assert inferred["image_token_index"] == hub["image_token_index"] and inferred["vocab_size"] == hub["vocab_size"]
    if model_name == "paligemma2-tiny":  # what the weights do not say: Gemma 2's published settings
        text = inferred["text_config"]
        assert (text["attn_logit_softcapping"], text["final_logit_softcapping"], text["sliding_window"]) == (
            50.0, 30.0, 4096)
        assert ckpt.bfloat16 and ckpt["llm/final_norm/scale"].dtype == np.uint16


def test_inferred_config_converts_and_runs(tmp_path, cases):
    # PaliGemma 1 needs nothing beyond the shapes: the same model as with the hub's config.json.
    out = convert(str(NPZ / "paligemma-tiny.npz"), str(tmp_path / "out"), dtype="float32",
                  tokenizer=str(FIXTURES / "paligemma-tiny"))
    model, processor = mp.load(str(out))
    reference, _ = mp.load(str(FIXTURES / "paligemma-tiny"))
    rows = slice(0, PIECES)  # logits over the real vocabulary
    np.testing.assert_array_equal(logits_of(model, processor, cases["single"])[..., rows],
                                  logits_of(reference, processor, cases["single"])[..., rows])


def test_stored_arrays_are_memory_mapped_and_compressed_ones_read(tmp_path):
    ckpt = big_vision.Checkpoint(NPZ / "paligemma2-tiny.npz")
    assert isinstance(ckpt["llm/layers/mlp/linear"].base, np.memmap)
    packed = tmp_path / "compressed.npz"
    with zipfile.ZipFile(NPZ / "paligemma2-tiny.npz") as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    again = big_vision.Checkpoint(packed)
    for name in ("llm/layers/mlp/linear", "img/embedding/kernel", "llm/embedder/input_embedding"):
        np.testing.assert_array_equal(again[name], ckpt[name])


def test_quantized_conversion_from_npz(tmp_path):
    out = convert_npz("paligemma2-tiny", tmp_path / "q", quantize_bits=4, group_size=32)
    model, _ = mp.load(str(out), dtype=mx.bfloat16)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert type(model.language_model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"


def test_processor_files_sized_for_the_model(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "paligemma2-tiny", tokenizer)
    settings = json.loads((tokenizer / "processor_config.json").read_text())
    settings["image_processor"].update(size={"height": 224, "width": 224}, image_seq_length=256)
    (tokenizer / "processor_config.json").write_text(json.dumps(settings))
    out = convert(str(NPZ / "paligemma2-tiny.npz"), str(tmp_path / "out"), tokenizer=str(tokenizer),
                  config=str(FIXTURES / "paligemma2-tiny" / "config.json"))
    written = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert written["size"] == {"height": 56, "width": 56} and written["image_seq_length"] == 16
    assert mp.load(str(out))[1].image_size == 56


def test_npz_errors_are_one_line(tmp_path, capsys):
    npz = str(NPZ / "paligemma-tiny.npz")
    assert main(["--hf-path", npz, "--mlx-path", str(tmp_path / "a")]) == 1
    assert "give --tokenizer" in capsys.readouterr().err
    garbage = tmp_path / "bad.npz"
    garbage.write_bytes(b"not a zip file" * 100)
    assert main(["--hf-path", str(garbage), "--mlx-path", str(tmp_path / "b"), "--tokenizer",
                 str(FIXTURES / "paligemma-tiny")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable .npz checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"], "nothing left behind"


def test_partial_names():
    assert partial_path(Path("/x/out"), 12).name == ".out.partial-12"
    assert partial_path(Path("/x/adapters.safetensors"), 12).name == ".adapters.partial-12.safetensors"


def start_slow_convert(out: Path) -> subprocess.Popen:
    """convert.py's main in a real process that stops for a minute once its weights are written, so a signal
    lands mid-conversion; returns when the partial folder holds the weights."""
    child = ("import sys, time\nimport mlx_paligemma.formats.mlx as f\nsave = f.save_weights\n"
             "def slow(*a, **k):\n    save(*a, **k)\n    time.sleep(60)\n"
             "f.save_weights = slow\nfrom mlx_paligemma.convert import main\n"
             f"sys.exit(main(['--hf-path', {str(FIXTURES / 'paligemma-tiny')!r}, '--mlx-path', {str(out)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT)
    deadline = time.time() + 120
    while not (partial_path(out, proc.pid) / "model.safetensors").is_file():
        assert proc.poll() is None and time.time() < deadline, "the child never started writing"
        time.sleep(0.05)
    return proc


def test_killed_convert_leaves_nothing_a_rerun_trips_over(tmp_path):
    out = tmp_path / "out"
    proc = start_slow_convert(out)
    proc.kill()
    proc.wait()
    assert partial_path(out, proc.pid).is_dir() and not out.exists()  # what SIGKILL leaves: a named partial folder
    convert(str(FIXTURES / "paligemma-tiny"), str(out))  # the rerun removes it (its process is gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # the umask's permissions, not 0700


def test_terminated_convert_cleans_up_itself(tmp_path):
    proc = start_slow_convert(tmp_path / "out")
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15
    assert list(tmp_path.iterdir()) == []


def test_a_live_writer_is_not_disturbed(tmp_path):
    (tmp_path / f".out.partial-{os.getppid()}").mkdir()  # our parent process is alive
    with pytest.raises(mp.InputError, match="being written by another process"):
        convert(str(FIXTURES / "paligemma-tiny"), str(tmp_path / "out"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("content, message", [
    (b"[1, 2, 3]", "is not a JSON object: it holds a JSON list"),
    (b'{"model_type": "paligemma", "text_config": "gemma"}', "text_config is str, expected an object"),
    ('{"model_type": "paligemma", "caf\xe9": 1}'.encode("latin-1"), "is not UTF-8 text"),
    (b'{"model_type": "paligemma", "text_config": {"hidden_size": "64"}}', "text_config: hidden_size is '64'"),
    (b'{"model_type": "paligemma", "vision_config": {"image_size": 5.5}}', "vision_config: image_size is 5.5"),
    (b'{"model_type": "paligemma", "text_config": {"rope_parameters": [1]}}', "rope_parameters is list"),
    (b'{"model_type": "paligemma", "image_token_index": true}', "image_token_index is True"),
    (b'{"model_type": "paligemma", "quantization": 4}', "quantization is 4"),
])
def test_bad_config_is_one_line(tmp_path, content, message):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "paligemma-tiny", folder)
    (folder / "config.json").write_bytes(content)
    for attempt in (lambda: mp.load(str(folder)), lambda: convert(str(folder), str(tmp_path / "out"))):
        with pytest.raises(mp.InputError) as e:
            attempt()
        assert "\n" not in str(e.value) and message in str(e.value) and "config.json" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unwritable_output_fails_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["--hf-path", str(FIXTURES / "paligemma-tiny"), "--mlx-path", str(tmp_path / "file" / "out")]) == 1
    captured = capsys.readouterr()
    assert "[convert] loading" not in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: cannot write {tmp_path / 'file' / 'out'}")


def test_adapters_are_written_atomically(tmp_path):
    from mlx_paligemma import lora
    from mlx_paligemma.formats.adapters import save_adapters

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".adapters.partial-{int(dead.stdout)}.safetensors"  # left by a killed run
    stale.write_bytes(b"half a file")
    model, _ = mp.load(str(FIXTURES / "paligemma-tiny"), dtype=mx.float32)
    config = lora.add_lora(model, rank=2)
    save_adapters(model, tmp_path, config)
    # The two files, and the record that says they are ours (formats.ownership.RECORD).
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD, "adapter_config.json", "adapters.safetensors"]
    assert (tmp_path / "adapters.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    mp.load(str(FIXTURES / "paligemma-tiny"), adapter_path=str(tmp_path))
