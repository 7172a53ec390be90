"""Hostile files against every writer and reader of files: the dataset runner, fine-tuning, convert, load, export.

After each case the invariants are checked, not only the message: what the command did not write is byte-identical
(inputs, unrelated outputs, checkpoints), outputs are complete and in input order, one bad line never stops the
others, and a rerun works. Refusals are one `error:` line naming the file (and line), never a traceback or a repr.
"""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import FIXTURES
from mlx_paligemma import batch, lora
from mlx_paligemma.errors import InputError

ROOT = Path(__file__).parent.parent
MODEL = FIXTURES / "paligemma2-tiny"
IMAGES = FIXTURES / "images"


def snapshot(*paths) -> dict:
    """The bytes of every file under the paths, by path: what must not change."""
    out = {}
    for path in map(Path, paths):
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert " object at 0x" not in err[0]
    return err[0]


# The dataset runner.

GOOD = [{"image": "chelsea.jpg", "prompt": "caption en"}, {"image": "coffee.jpg", "prompt": "ocr", "id": "c"}]


def dataset(folder: Path, lines) -> Path:
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(IMAGES / name, folder / name)
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    (folder / "items.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    return folder / "items.jsonl"


def run_batch(data: Path, out: Path, *more) -> int:
    return batch.main(["--model", str(MODEL), "--input", str(data), "--output", str(out), "--max-tokens", "4",
                       "--batch-size", "2", *more])


@pytest.mark.parametrize("kind", ["text", "jpg", "safetensors", "empty-looking json"])
def test_an_unrelated_existing_output_is_refused_and_left_byte_identical(tmp_path, capsys, kind):
    data = dataset(tmp_path, GOOD)
    out = {"text": tmp_path / "notes.txt", "jpg": tmp_path / "photo.jpg",
           "safetensors": tmp_path / "model.safetensors", "empty-looking json": tmp_path / "other.jsonl"}[kind]
    if kind == "text":
        out.write_text("my notes\nthe last line, without its newline")
    elif kind == "jpg":
        shutil.copy(IMAGES / "chelsea.jpg", out)
    elif kind == "safetensors":
        shutil.copy(MODEL / "model.safetensors", out)
    else:
        out.write_text('{"id": 1}\n{"id"')  # our first key, but not our line: not ours either
    before = snapshot(tmp_path)
    assert run_batch(data, out) == 1
    assert one_error_line(capsys).startswith(f"error: {out} exists and is not the output of this run")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_an_output_that_is_the_input_by_inode_is_refused(tmp_path, capsys, link):
    data = dataset(tmp_path, GOOD)
    out = tmp_path / "out.jsonl"
    (os.link if link == "hard" else os.symlink)(data, out)
    before = snapshot(data)
    assert run_batch(data, out) == 1
    assert one_error_line(capsys) == f"error: --output {out} is the input file"
    assert snapshot(data) == before


def test_an_output_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys):
    data = dataset(tmp_path, GOOD)
    os.mkfifo(tmp_path / "fifo")  # opening it to read its first line would wait for a writer forever
    assert run_batch(data, tmp_path / "fifo") == 1
    assert one_error_line(capsys) == f"error: --output {tmp_path / 'fifo'} is not a regular file"


BAD_LINES = [
    (b"[" * 5000 + b"]" * 5000, "not valid JSON: nested too deeply"),
    (b'{"image": "chelsea.jpg", "prompt": "caption \\ud800"}', "prompt is not valid text: lone surrogate"),
    (b'{"image": "chelsea.jpg", "prompt": "caption en", "note": "\\udfff"}', "not valid Unicode"),
    (b'{"image": "chelsea.jpg", "prompt": "caf\xe9"}', "not UTF-8 text"),
    (b'{"image": "chelsea.jpg", "prompt": "caption en", "n": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"image": "chelsea.jpg", "prompt": "caption en", "prefix": "ocr"}', "'prompt' and 'prefix' differ"),
    (b'{"image": "a\\u0000.jpg", "prompt": "caption en"}', "is not a usable path"),
    (b'{"image": [], "prompt": "caption en"}', "'image' must be a path or URL"),
]


def test_every_bad_line_is_an_error_line_and_the_run_goes_on_and_reruns(tmp_path, capsys):
    lines = [GOOD[0]] + [bad for bad, _ in BAD_LINES] + [GOOD[1], {"image": "chelsea.jpg", "prompt": "ocr",
                                                                   "id": float("nan")}]
    data = dataset(tmp_path, lines)
    before = snapshot(data)
    out = tmp_path / "out.jsonl"
    assert run_batch(data, out) == 0
    written = [json.loads(line) for line in out.read_bytes().decode().split("\n")[:-1]]
    assert len(written) == len(lines)  # complete, one line per item, in input order
    assert [w["id"] for w in written[:len(BAD_LINES) + 2]] == list(range(1, len(BAD_LINES) + 2)) + ["c"]
    for w, (_, message) in zip(written[1:], BAD_LINES):
        assert "text" not in w and message in w["error"], w
    assert "text" in written[0] and "text" in written[-2] and "text" in written[-1]
    assert snapshot(data) == before
    capsys.readouterr()
    # A rerun of the complete run (NaN id and all) finds it complete and changes nothing.
    done = out.read_bytes()
    assert run_batch(data, out) == 0 and out.read_bytes() == done


def test_a_training_file_is_batch_run_as_it_is(tmp_path):
    rows = [{"image": "chelsea.jpg", "prefix": "caption en", "suffix": "a cat"},
            {"image": "coffee.jpg", "prefix": "caption en", "suffix": ["a cup", "coffee"]}]
    data = dataset(tmp_path, rows)
    out = tmp_path / "out.jsonl"
    assert run_batch(data, out) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["suffix"] for w in written] == ["a cat", ["a cup", "coffee"]]  # the references travel along
    assert all("text" in w and "error" not in w and "prompt" not in w for w in written)


def test_a_first_line_torn_by_a_kill_is_ours_and_foreign_part_files_are_left(tmp_path, capsys):
    data = dataset(tmp_path, GOOD)
    out = tmp_path / "out.jsonl"
    assert run_batch(data, out) == 0
    expected = out.read_bytes()
    out.write_bytes(expected[:12])  # killed while writing the first line
    foreign = tmp_path / "out.jsonl.rank0.part"
    foreign.write_text("someone's notes that happen to have this name\n")
    before = snapshot(foreign)
    assert run_batch(data, out) == 0
    assert out.read_bytes() == expected and snapshot(foreign) == before


def test_a_line_lost_in_the_middle_is_refused_before_anything_is_cut(tmp_path, capsys):
    data = dataset(tmp_path, GOOD + [GOOD[0]])
    out = tmp_path / "out.jsonl"
    assert run_batch(data, out) == 0
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(lines[0] + b"\n" + lines[2] + b"\n" + b'{"torn')  # item 2's line is gone
    before = snapshot(out)
    capsys.readouterr()
    assert run_batch(data, out) == 1
    assert "line 2 is not the output for item 2" in one_error_line(capsys)
    assert snapshot(out) == before


def test_evaluate_and_training_read_the_same_items_naming_file_and_line(tmp_path):
    from mlx_paligemma.data.items import read_jsonl

    data = dataset(tmp_path, [{"image": "chelsea.jpg", "prompt": "caption en", "suffix": "a cat"},
                              b'{"image": "chelsea.jpg", "prefix": "x\\ud800", "suffix": "y"}'])
    with pytest.raises(InputError, match=rf"^{data}, line 2: prefix is not valid text: lone surrogate"):
        read_jsonl(data)
    data.write_bytes(data.read_bytes().split(b"\n")[0] + b"\n" + b"[" * 5000 + b"\n")
    with pytest.raises(InputError, match=rf"^{data}, line 2: not valid JSON: nested too deeply"):
        read_jsonl(data)


# Fine-tuning.

def train_data(folder: Path, suffix: str = "a cat") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image": str(IMAGES / "chelsea.jpg"), "prefix": "caption en", "suffix": suffix},
            {"image": str(IMAGES / "coffee.jpg"), "prefix": "caption en", "suffix": "a cup"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train(data: Path, adapters: Path, *more) -> int:
    return lora.main(["--model", str(MODEL), "--data", str(data), "--adapter-path", str(adapters), "--iters", "2",
                      "--batch-size", "1", "--lora-rank", "4", "--steps-per-report", "1", *more])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A LoRA checkpoint after 2 of 2 steps, and its data."""
    folder = tmp_path_factory.mktemp("checkpoint")
    data = train_data(folder / "data")
    assert train(data, folder / "adapters") == 0
    return data, folder / "adapters"


def copy_of(checkpoint, tmp_path):
    data, adapters = checkpoint
    shutil.copytree(adapters, tmp_path / "adapters")
    return data, tmp_path / "adapters"


@pytest.mark.parametrize("change, message", [
    (["--lora-rank", "8"], '--lora-rank 4, this command 8'),
    (["--lora-layers", "attention"], "--lora-layers"),
    (["--num-layers", "1"], "--num-layers -1, this command 1"),
    (["--fine-tune-type", "full"], '--fine-tune-type "lora", this command "full"'),
    (["--model", str(FIXTURES / "paligemma-tiny")], "--model"),
    (["--data", "OTHER"], "trained on other data"),
])
def test_resume_with_other_settings_is_refused_touching_nothing(checkpoint, tmp_path, capsys, change, message):
    data, adapters = copy_of(checkpoint, tmp_path)
    if change[-1] == "OTHER":
        change = ["--data", str(train_data(tmp_path / "other", suffix="a dog"))]
    before = snapshot(adapters)
    argv = ["--model", str(MODEL), "--data", str(data), "--adapter-path", str(adapters), "--iters", "4",
            "--batch-size", "1", "--lora-rank", "4", "--resume"]
    for i in range(0, len(change), 2):  # the change replaces the option
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    assert lora.main(argv) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot resume from {adapters}: ") and message in line, line
    assert snapshot(adapters) == before


def test_resume_with_the_same_settings_goes_on(checkpoint, tmp_path, capsys):
    data, adapters = copy_of(checkpoint, tmp_path)
    assert train(data, adapters, "--iters", "3", "--resume") == 0
    out = capsys.readouterr().out
    assert "Resumed from" in out and "at step 2" in out and "Iter 3: train loss" in out


def test_existing_adapters_are_not_overwritten_without_a_flag(checkpoint, tmp_path, capsys):
    data, adapters = copy_of(checkpoint, tmp_path)
    before = snapshot(adapters)
    assert train(data, adapters) == 1
    assert one_error_line(capsys).startswith(f"error: {adapters} already holds adapters")
    assert snapshot(adapters) == before
    assert train(data, adapters, "--overwrite", "--seed", "1") == 0
    assert snapshot(adapters) != before


@pytest.mark.parametrize("damage, file", [
    (lambda f: f.write_text("{not json"), "trainer_state.json"),
    (lambda f: f.write_text('{"best_score": null}'), "trainer_state.json"),
    (lambda f: f.write_text('{"step": "2"}'), "trainer_state.json"),
    (lambda f: f.write_text("[1, 2]"), "adapter_config.json"),
    (lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2]), "adapters.safetensors"),
    (lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2]), "optimizer.safetensors"),
    (lambda f: f.write_bytes(b"\0" * 8), "optimizer.safetensors"),
    (lambda f: f.unlink(), "optimizer.safetensors"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(checkpoint, tmp_path, capsys, damage, file):
    data, adapters = copy_of(checkpoint, tmp_path)
    damage(adapters / file)
    before = snapshot(adapters)
    assert train(data, adapters, "--iters", "3", "--resume") == 1
    line = one_error_line(capsys)
    assert file in line and "unexpected" not in line, line
    assert snapshot(adapters) == before


def test_a_checkpoint_of_other_parameters_is_refused(checkpoint, tmp_path, capsys):
    """adapters.safetensors from a run of another rank behind a config that says rank 4: not the file the run wrote
    there, so the command refuses it before the model loads; read anyway, it is caught by shape."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_paligemma as mp
    from mlx_paligemma.training import trainer

    data, adapters = copy_of(checkpoint, tmp_path)
    assert train(data, tmp_path / "rank8", "--lora-rank", "8") == 0
    shutil.copy(tmp_path / "rank8" / "adapters.safetensors", adapters / "adapters.safetensors")
    before = snapshot(adapters)
    assert train(data, adapters, "--iters", "3", "--resume") == 1
    assert one_error_line(capsys) == (f"error: --adapter-path {adapters}: {adapters / 'adapters.safetensors'} has "
                                      "changed since a training run wrote it; move it away")
    assert snapshot(adapters) == before
    model, _ = mp.load(str(MODEL), dtype=mx.float32)
    trainer.add_lora(model, rank=4)
    with pytest.raises(InputError, match="adapters.safetensors does not fit this model's trainable parameters"):
        trainer.load_checkpoint(model, optim.Adam(1e-3), adapters)


def test_an_unwritable_adapter_path_is_refused_before_training(tmp_path, capsys):
    data = train_data(tmp_path / "data")
    (tmp_path / "a-file").write_text("mine")
    # A folder cannot be made under a regular file, for root too.
    assert train(data, tmp_path / "a-file" / "adapters") == 1
    captured = capsys.readouterr()
    assert "Iter" not in captured.out
    assert captured.err.strip() == f"error: cannot write to --adapter-path {tmp_path / 'a-file' / 'adapters'}: Not a directory"
    assert (tmp_path / "a-file").read_text() == "mine"
    # A --fuse --save-path that cannot be made is found before training as well.
    assert train(data, tmp_path / "adapters", "--fuse", "--save-path", str(tmp_path / "a-file" / "fused")) == 1
    assert "Iter" not in capsys.readouterr().out and not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("row, message", [
    ({"prefix": "caption en", "suffix": "a cat " * 5000}, "tokens with the image's 16, more than the model's"),
    ({"prefix": "<image><image>caption en", "suffix": "a cat"}, "the prefix has 2 <image> markers for one image"),
    ({"prefix": "caption en", "suffix": "a <image> cat"}, "the suffix holds <image>"),
])
def test_examples_are_checked_before_the_first_step(tmp_path, capsys, row, message):
    data = train_data(tmp_path / "data")
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"image": str(IMAGES / "chelsea.jpg"), **row}) + "\n")
    assert train(data, tmp_path / "adapters") == 1
    captured = capsys.readouterr()
    assert "Iter" not in captured.out
    err = captured.err.strip()
    assert err.startswith(f"error: {data / 'train.jsonl'}, line 3: ") and message in err and "\n" not in err, err


def test_trainable_parameters_for_full_fine_tuning(tmp_path, capsys):
    from mlx.utils import tree_flatten

    import mlx_paligemma as mp

    model, _ = mp.load(str(MODEL))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    decoder = sum(v.size for _, v in tree_flatten(model.language_model.parameters()))
    data = train_data(tmp_path / "data")
    assert train(data, tmp_path / "full", "--fine-tune-type", "full", "--iters", "1") == 0
    expected = f"Trainable parameters: {100 * decoder / total:.3f}% ({decoder / 1e6:.3f}M of {total / 1e6:.3f}M)"
    assert expected in capsys.readouterr().out
    assert train(data, tmp_path / "all", "--fine-tune-type", "full", "--train-vision", "--iters", "1") == 0
    assert f"Trainable parameters: 100.000% ({total / 1e6:.3f}M of {total / 1e6:.3f}M)" in capsys.readouterr().out


# Configs: one reader, shared by load, convert and export.

@pytest.mark.parametrize("section, key, value, message", [
    ("text_config", "num_hidden_layers", 1000000, "text_config.num_hidden_layers is 1000000, expected 1 to 4600"),
    ("text_config", "hidden_size", 0, "text_config.hidden_size is 0, expected 1 to"),
    ("vision_config", "image_size", -224, "vision_config.image_size is -224, expected 1 to"),
    ("text_config", "vocab_size", 10 ** 12, "text_config.vocab_size is 1000000000000, expected 1 to"),
    ("text_config", "num_key_value_heads", 3, "is not a multiple of num_key_value_heads (3)"),
    ("vision_config", "patch_size", 100, "image tokens, expected 1 to"),
])
def test_absurd_config_sizes_fail_fast_in_load_convert_and_export(tmp_path, section, key, value, message):
    import mlx_paligemma as mp
    from mlx_paligemma.convert import convert
    from mlx_paligemma.export import export

    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config[section][key] = value
    (model / "config.json").write_text(json.dumps(config))
    before = snapshot(model)
    for attempt in (lambda: mp.load(str(model)), lambda: convert(str(model), str(tmp_path / "mlx")),
                    lambda: export(str(model), str(tmp_path / "hf"))):
        with pytest.raises(InputError) as e:
            attempt()
        assert str(e.value).startswith(f"{model / 'config.json'}: ") and message in str(e.value), str(e.value)
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output folder, no partial left
    if value != 1000000:
        return
    # Through the script (the case; a subprocess costs seconds of imports): one line, no traceback.
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(model), "--mlx-path", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr


@pytest.mark.parametrize("existing", ["folder", "file", "link"])
def test_folder_writers_refuse_an_existing_output(tmp_path, capsys, existing):
    from mlx_paligemma.convert import convert
    from mlx_paligemma.export import export

    out = tmp_path / "out"
    if existing == "folder":
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    elif existing == "file":
        out.write_text("mine")
    else:
        (tmp_path / "target").write_text("mine")
        out.symlink_to(tmp_path / "target")
    before = snapshot(tmp_path)
    for attempt in (lambda: convert(str(MODEL), str(out)), lambda: export(str(MODEL), str(out)),
                    lambda: lora.save_fused(None, str(MODEL), str(out))):
        with pytest.raises(InputError, match=f"^output folder {out} already exists"):
            attempt()
    assert lora.main(["--model", str(MODEL), "--adapter-path", str(tmp_path), "--fuse", "--save-path", str(out)]) == 1
    assert one_error_line(capsys).startswith(f"error: output folder {out} already exists")
    assert snapshot(tmp_path) == before


def test_batch_applies_adapters_and_names_a_damaged_adapter_file(checkpoint, tmp_path, capsys):
    import mlx_paligemma as mp

    import mlx.core as mx

    # The checkpoint's adapters with large random B matrices, so that answers with them differ from the base's.
    adapters = tmp_path / "strong"
    shutil.copytree(checkpoint[1], adapters)
    weights = mx.load(str(adapters / "adapters.safetensors"))
    mx.random.seed(0)
    weights = {k: mx.random.normal(w.shape) if "lora_b" in k else w for k, w in weights.items()}
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    data = dataset(tmp_path, GOOD)
    out = tmp_path / "out.jsonl"
    assert run_batch(data, out, "--adapter-path", str(adapters)) == 0
    model, base = mp.load(str(MODEL), adapter_path=str(adapters)), mp.load(str(MODEL))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for line in lines:
        assert line["text"] == mp.generate(*model, str(tmp_path / line["image"]), line["prompt"], max_tokens=4).text
    assert any(line["text"] != mp.generate(*base, str(tmp_path / line["image"]), line["prompt"], max_tokens=4).text
               for line in lines)
    damaged = tmp_path / "damaged"
    shutil.copytree(adapters, damaged)
    (damaged / "adapter_config.json").write_text("{")
    capsys.readouterr()
    assert run_batch(data, tmp_path / "out2.jsonl", "--adapter-path", str(damaged)) == 1
    assert one_error_line(capsys).startswith(f"error: {damaged / 'adapter_config.json'} is not valid JSON")


# Reads bounded before the work: regular files only, size caps, one line naming the file.

def test_bounded_reads_refuse_fifos_devices_folders_and_big_files(tmp_path):
    from mlx_paligemma.errors import read_bounded, read_json_object

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it to read would block
    cases = {fifo: f"cannot read {fifo}: it is a FIFO, not a regular file",
             tmp_path: f"cannot read {tmp_path}: it is a folder, not a regular file"}
    if Path("/dev/zero").exists():
        cases[Path("/dev/zero")] = "cannot read /dev/zero: it is a device or socket, not a regular file"
    for path, message in cases.items():
        with pytest.raises(InputError) as e:
            read_bounded(path, 100)
        assert str(e.value) == message
    (tmp_path / "big.json").write_text("{}" + " " * 200)
    with pytest.raises(InputError, match=r"big.json is 202 bytes or more, more than the limit of 100$"):
        read_json_object(tmp_path / "big.json", 100)
    assert read_json_object(tmp_path / "big.json", 202) == {}


@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "big"])
def test_a_json_schema_file_that_never_ends_is_one_line_before_the_model_loads(tmp_path, capsys, what):
    generate = importlib.import_module("mlx_paligemma.generate")  # the package's `generate` is the function
    from mlx_paligemma.limits import MAX_SCHEMA_FILE_BYTES

    if what == "/dev/zero" and not Path(what).exists():
        pytest.skip("needs /dev/zero (Linux, macOS)")
    path = Path(what) if what == "/dev/zero" else tmp_path / what
    if what == "fifo":
        os.mkfifo(path)
    elif what == "big":
        path.write_text('{"type": "string", "description": "' + "x" * MAX_SCHEMA_FILE_BYTES + '"}')
    rc = generate.main(["--model", "missing-model-never-loaded", "--image", str(IMAGES / "chelsea.jpg"), "--prompt",
                        "caption en", "--json-schema", str(path)])
    line = one_error_line(capsys)
    assert rc == 1 and line.startswith(f"error: cannot read --json-schema {path}: " if what != "big"
                                       else f"error: --json-schema {path} is ")


def test_a_jsonl_line_over_the_limit_is_its_items_error_and_the_rest_are_read(tmp_path, monkeypatch):
    from mlx_paligemma.data import items as items_module

    monkeypatch.setattr(items_module, "MAX_LINE_BYTES", 200)
    good = json.dumps({"image": "chelsea.jpg", "prompt": "caption en"})
    long = json.dumps({"image": "chelsea.jpg", "prompt": "x" * 500})
    (tmp_path / "d.jsonl").write_text("\n".join([good, long, good, "x" * 1000]) + "\n" + good)
    read = items_module.read_items(tmp_path / "d.jsonl")
    assert [(i.line, i.error) for i in read] == [
        (1, None), (2, "the line is longer than the limit of 200 bytes"), (3, None),
        (4, "the line is longer than the limit of 200 bytes"), (5, None)]
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(InputError, match="it is a FIFO, not a regular file"):
        items_module.read_items(tmp_path / "fifo.jsonl")


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG declaring this size (its pixels never follow): what a header check reads."""
    chunk = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    end = (0).to_bytes(4, "big") + b"IEND" + zlib.crc32(b"IEND").to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big") + end


def test_a_bad_last_row_is_named_before_any_image_is_decoded(tmp_path, monkeypatch):
    """The whole set is checked (fields, then each image file's header) before an image is decoded: a large set
    whose last row is bad is named at once."""
    from mlx_paligemma.data import items as items_module

    shutil.copy(IMAGES / "chelsea.jpg", tmp_path / "chelsea.jpg")
    rows = [json.dumps({"image": "chelsea.jpg", "prefix": "caption en", "suffix": "a cat"})] * 3000
    (tmp_path / "t.jsonl").write_text("\n".join(rows + ['{"image": "chelsea.jpg", "prefix": "caption en"}']) + "\n")

    def no_decoding(*_):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(items_module, "load_image", no_decoding)
    with pytest.raises(InputError) as e:
        items_module.read_jsonl(tmp_path / "t.jsonl")
    assert str(e.value) == f"{tmp_path / 't.jsonl'}, line 3001: 'suffix' is missing: nothing to learn or score against"
    (tmp_path / "t.jsonl").write_text("\n".join(rows + ['{"image": "gone.jpg", "prefix": "c", "suffix": "s"}']) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl, line 3001: image not found: .*gone.jpg$"):
        items_module.read_jsonl(tmp_path / "t.jsonl")
    (tmp_path / "bomb.png").write_bytes(png_header(100000, 100000))
    (tmp_path / "t.jsonl").write_text("\n".join(rows + ['{"image": "bomb.png", "prefix": "c", "suffix": "s"}']) + "\n")
    with pytest.raises(InputError, match=r"line 3001: image .*bomb.png is (100000x100000 pixels, more than|too large)"):
        items_module.read_jsonl(tmp_path / "t.jsonl")
    monkeypatch.undo()
    (tmp_path / "t.jsonl").write_text("\n".join(rows[:3]) + "\n")
    assert [e.image for e in items_module.read_jsonl(tmp_path / "t.jsonl")] == [str(tmp_path / "chelsea.jpg")] * 3


def test_an_image_damaged_past_its_header_is_named_by_its_line_when_training_reads_it(tmp_path):
    from mlx_paligemma.data.items import read_jsonl
    from mlx_paligemma.training.trainer import make_batch

    data = (IMAGES / "chelsea.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "cut.jpg", "prefix": "caption en", "suffix": "a"}) + "\n")
    examples = read_jsonl(tmp_path / "t.jsonl")  # the header reads
    import mlx_paligemma as mp
    _, processor = mp.load(str(MODEL))
    with pytest.raises(InputError, match=rf"^{tmp_path / 't.jsonl'}, line 1: cannot read image "):
        make_batch(processor, examples)


@pytest.mark.parametrize("declared", [(4510, 3000), (10**12, 10**12), (300, 451)])
def test_a_coco_size_that_is_not_the_files_is_the_images_error(tmp_path, declared):
    from mlx_paligemma.data.coco import coco_items

    shutil.copy(IMAGES / "chelsea.jpg", tmp_path / "chelsea.jpg")  # 451 x 300
    coco = {"images": [{"id": 1, "file_name": "chelsea.jpg", "width": declared[0], "height": declared[1]}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    items = coco_items(tmp_path / "c.json")
    assert [i.error for i in items] == [f"image chelsea.jpg is 451x300 pixels, but its entry declares "
                                        f"{declared[0]}x{declared[1]}: its boxes would be scaled wrong"]
    coco["images"][0].update(width=451, height=300)
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert [i.error for i in coco_items(tmp_path / "c.json")] == [None]


def test_a_row_with_neither_bytes_nor_path_says_so(tmp_path):
    datasets = pytest.importorskip("datasets")
    from mlx_paligemma.data.hub import dataset_items
    from mlx_paligemma.data.sources import DataOptions

    ds = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": None}], "prefix": ["c"], "suffix": ["s"]})
    [item] = dataset_items(ds, "d", tmp_path, DataOptions())
    assert item.error == "'image' must hold an image (datasets' Image, bytes, or a path), got an image with neither " \
                         "bytes nor a path"


def test_a_broken_parquet_is_our_one_line_alone(tmp_path, capsys):
    pytest.importorskip("datasets")
    from mlx_paligemma import evaluate

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not parquet at all")
    rc = evaluate.main(["--model", "missing-model-never-loaded", "--data", str(tmp_path / "broken.parquet")])
    assert rc == 1 and one_error_line(capsys).startswith(f"error: cannot read {tmp_path / 'broken.parquet'}: ")


# Late checks made early: what would fail after the work is refused before it.

def test_evaluate_refuses_predictions_inside_the_report_before_work(tmp_path, capsys):
    from mlx_paligemma import evaluate

    data = dataset(tmp_path, [{"image": "chelsea.jpg", "prompt": "caption en", "suffix": "a cat"}])
    rc = evaluate.main(["--model", "missing-model-never-loaded", "--data", str(data), "--report",
                        str(tmp_path / "D"), "--predictions", str(tmp_path / "D" / "p.jsonl")])
    assert rc == 1 and one_error_line(capsys) == (
        f"error: --predictions {tmp_path / 'D' / 'p.jsonl'}: give a file in a folder that exists")
    (tmp_path / "D").mkdir()
    rc = evaluate.main(["--model", "missing-model-never-loaded", "--data", str(data), "--report",
                        str(tmp_path / "D"), "--predictions", str(tmp_path / "D" / "p.jsonl")])
    assert rc == 1 and one_error_line(capsys) == (
        f"error: --predictions {tmp_path / 'D' / 'p.jsonl'} is inside the --report folder, which the report "
        "replaces whole: give a file outside it")
    assert os.listdir(tmp_path / "D") == []


def test_evaluate_of_detections_without_pycocotools_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from mlx_paligemma import evaluate

    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # import fails as when it is not installed
    data = dataset(tmp_path, [{"image": "chelsea.jpg", "prompt": "detect cat", "suffix": "<loc0001> cat"}])
    rc = evaluate.main(["--model", str(FIXTURES / "paligemma2-tiny"), "--data", str(data)])
    assert rc == 1 and one_error_line(capsys) == ('error: pycocotools is needed for detection metrics: pip install '
                                                  '"mlx-paligemma[eval]"')


def test_a_candidate_too_long_for_the_model_is_named_before_the_first_answer(tmp_path, capsys, monkeypatch):
    from mlx_paligemma import evaluate
    from mlx_paligemma.tasks import evaluation

    monkeypatch.setattr(evaluation, "batch_generate", None, raising=False)
    rows = [{"image": "chelsea.jpg", "prompt": "answer en what is it?", "suffix": "cat", "candidates": ["cat", "dog"]},
            {"image": "chelsea.jpg", "prompt": "answer en what is it?", "suffix": "cat",
             "candidates": ["cat", "a" + " a" * 9000]}]
    data = dataset(tmp_path, rows)
    rc = evaluate.main(["--model", str(MODEL), "--data", str(data)])
    line = one_error_line(capsys)
    assert rc == 1 and line.startswith(f"error: {data}, line 2: candidate 2 makes ") and line.endswith(
        "tokens with the prompt and the image's 16, more than the model's 8192"), line


def test_generate_refuses_an_unwritable_draw_and_ignored_flags_before_loading(tmp_path, capsys):
    generate = importlib.import_module("mlx_paligemma.generate")  # the package's `generate` is the function

    base = ["--model", "missing-model-never-loaded", "--image", str(IMAGES / "chelsea.jpg"), "--prompt", "detect cat"]
    if Path("/proc").is_dir():  # Linux: a folder that takes no new file, whoever runs the test
        assert generate.main([*base, "--draw", "/proc/x.png"]) == 1
        assert one_error_line(capsys).startswith("error: --draw /proc/x.png: cannot write there: ")
    for flag in (["--regex", "a+"], ["--num-beams", "2"]):
        assert generate.main([*base, "--candidates", "a", "b", *flag]) == 1
        assert one_error_line(capsys) == f"error: --candidates scores the given answers as they are: it takes no {flag[0]}"


def test_evaluate_refuses_a_report_folder_it_cannot_write_before_work(tmp_path, capsys):
    from mlx_paligemma import evaluate

    if not Path("/proc").is_dir():
        pytest.skip("needs Linux: /proc takes no new file, whoever runs the test")
    data = dataset(tmp_path, [{"image": "chelsea.jpg", "prompt": "caption en", "suffix": "a cat"}])
    rc = evaluate.main(["--model", "missing-model-never-loaded", "--data", str(data), "--report", "/proc/report"])
    assert rc == 1 and one_error_line(capsys).startswith("error: --report /proc/report: cannot write there: ")


def test_a_datasets_bad_last_row_is_named_before_any_stored_image_is_decoded(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from mlx_paligemma.data import hub, sources

    data = (IMAGES / "chelsea.jpg").read_bytes()
    rows = 300
    ds = datasets.Dataset.from_dict({"image": [{"bytes": data + bytes([i % 7]), "path": None} for i in range(rows)],
                                     "prefix": ["caption en"] * rows, "suffix": ["a cat"] * (rows - 1) + [None]})
    ds.save_to_disk(str(tmp_path / "saved"))

    def no_decoding(*_):
        raise AssertionError("a stored image was decoded")

    monkeypatch.setattr(hub, "image_from_bytes", no_decoding)
    with pytest.raises(InputError) as e:
        sources.read_examples(str(tmp_path / "saved"))
    assert str(e.value) == f"{tmp_path / 'saved'}, row {rows}: 'suffix' is missing: nothing to learn or score " \
                           "against"
    monkeypatch.undo()
    items = sources.read_source(str(tmp_path / "saved"))  # batch: every row an item, the bad one with its error
    assert len(items) == rows and not any(i.error for i in items) and items[-1].suffixes == []
    assert all(isinstance(i.images[0], Image.Image) for i in items)


def test_training_that_scores_detections_without_pycocotools_stops_before_the_first_step(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # import fails as when it is not installed
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"image": str(IMAGES / "chelsea.jpg"), "prefix": "detect cat", "suffix": "<loc0001><loc0002><loc0500>"
             "<loc0600> cat"}] * 2
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = train(data, tmp_path / "adapters", "--eval-task", "auto")
    assert rc == 1 and one_error_line(capsys) == ("error: pycocotools is needed for --eval-task's detection metrics: "
                                                  'pip install "mlx-paligemma[eval]"')
    assert not (tmp_path / "adapters" / "log.jsonl").exists()
