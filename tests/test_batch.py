"""The dataset runner: answers equal to generate, error lines, folder input, resume after a real SIGKILL, a torn
last line, part files, and two processes under mlx.launch writing the same OUT as one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma.batch import main
from mlx_paligemma.processing.tokens import piece
from test_detection import SEG16, vae  # noqa: F401  (vae: random mask-decoder weights of the real shapes)

ROOT = Path(__file__).parent.parent
MODEL = FIXTURES / "paligemma2-tiny"
MAX_TOKENS = 6
# Mixed prompts, a two-image item, an item without a prompt of its own (it takes --prompt), a missing image, a
# truncated image, a line that is not JSON; repeated, so that a run lasts long enough to be killed partway.
LINES = [
    {"image": "chelsea.jpg", "prompt": "caption en"},
    {"image": "coffee.jpg", "prompt": "answer en what is on the table?", "id": "coffee", "reference": ["a cup"]},
    {"image": ["chelsea.jpg", "coffee.jpg"], "prompt": "answer en which one shows a cat, first or second?"},
    {"image": "missing.jpg", "prompt": "caption en"},
    {"image": "truncated.jpg", "prompt": "ocr"},
    "not json",
    {"image": "gray.png"},
    {"image": "odd.png", "prompt": "detect cat ; dog"},
]


def write_dataset(folder: Path, copies: int = 1) -> Path:
    for name in ("chelsea.jpg", "coffee.jpg", "gray.png", "odd.png"):
        shutil.copy(FIXTURES / "images" / name, folder / name)
    data = (FIXTURES / "images" / "chelsea.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    lines = [line if isinstance(line, str) else json.dumps(line) for line in LINES] * copies
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "items.jsonl"


def args(data: Path, out: Path, *more) -> list:
    return ["--model", str(MODEL), "--input", str(data), "--output", str(out), "--prompt", "describe en",
            "--max-tokens", str(MAX_TOKENS), "--batch-size", "3", *more]


def read(out: Path) -> list:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def model():
    return mp.load(str(MODEL))


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """The dataset twice over and the OUT of one uninterrupted run over it."""
    folder = tmp_path_factory.mktemp("complete")
    data = write_dataset(folder, copies=2)
    assert main(args(data, folder / "out.jsonl", "--json")) == 0
    return data, (folder / "out.jsonl").read_bytes()


def test_answers_equal_generate_and_bad_items_get_error_lines(complete, model):
    data, out = complete
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert len(lines) == 2 * len(LINES)
    first = lines[: len(LINES)]
    assert [line["id"] for line in first] == [1, "coffee", 3, 4, 5, 6, 7, 8]
    assert first[1]["reference"] == ["a cup"]  # the item's own fields are kept
    assert first[6]["prompt"] == "describe en"  # --prompt for the line without one
    assert first[3]["error"] == f"image not found: {data.parent / 'missing.jpg'}"
    assert first[4]["error"].startswith(f"cannot read image {data.parent / 'truncated.jpg'}: image file is truncated")
    assert first[5]["error"].startswith("not valid JSON")
    good = [line for line in first if "error" not in line]
    assert len(good) == 5
    for line in good:
        images = line["image"] if isinstance(line["image"], list) else [line["image"]]
        alone = mp.generate(*model, [str(data.parent / i) for i in images], line["prompt"], max_tokens=MAX_TOKENS)
        expected = alone.text
        assert line["text"] == expected, line
        # Every line says how its answer ended and its token counts, as the Python result does.
        assert (line["finish_reason"], line["prompt_tokens"], line["generation_tokens"]) == \
            (alone.finish_reason, alone.prompt_tokens, alone.generation_tokens)
        from mlx_paligemma.tasks.detection import objects_to_json, parse_detections, token_ends

        size = Image.open(data.parent / images[0]).size
        if line["prompt"].startswith("detect "):  # objects only on detect/segment answers, scored by their tokens
            g = mp.generate(*model, [str(data.parent / i) for i in images], line["prompt"], max_tokens=MAX_TOKENS,
                            logprobs=0)
            ends = token_ends(g.tokens, model[1].tokenizer.decode)
            assert line["objects"] == objects_to_json(parse_detections(expected, size, ends=ends, logprobs=g.logprobs))
            assert all(0 < o["score"] <= 1 for o in line["objects"])
        else:
            assert "objects" not in line
    # The second copy of every item gives the same line (ids aside: they are line numbers).
    for a, b in zip(first, lines[len(LINES):]):
        assert {k: v for k, v in a.items() if k != "id"} == {k: v for k, v in b.items() if k != "id"}


def test_folder_input(tmp_path, model):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(FIXTURES / "images" / "coffee.jpg", folder / "b.jpg")
    shutil.copy(FIXTURES / "images" / "chelsea.jpg", folder / "sub" / "a.jpg")
    shutil.copy(FIXTURES / "images" / "rgba.png", folder / "a.png")
    (folder / "._a.jpg").write_bytes(b"macOS resource fork")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out.jsonl"
    assert main(args(folder, out, "--prompt", "caption en")) == 0
    lines = read(out)
    assert [(line["id"], line["image"]) for line in lines] == [(1, "a.png"), (2, "b.jpg"), (3, "sub/a.jpg")]
    for line in lines:
        want = mp.generate(*model, str(folder / line["image"]), "caption en", max_tokens=MAX_TOKENS)
        assert line["text"] == want.text


def test_an_image_with_several_prompts_is_encoded_once(tmp_path, monkeypatch):
    from mlx_paligemma.generation.engine import feature_cache

    loaded = mp.load(str(MODEL))  # a model of its own, with a feature cache of its own
    monkeypatch.setattr("mlx_paligemma.formats.loading.load", lambda path, **kw: loaded)
    write_dataset(tmp_path)
    prompts = ["caption en", "ocr", "answer en what is this?", "detect cat"]
    lines = [{"image": "chelsea.jpg", "prompt": p} for p in prompts] + [{"image": ["coffee.jpg", "chelsea.jpg"]}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert main(args(tmp_path / "items.jsonl", tmp_path / "out.jsonl")) == 0
    assert len(read(tmp_path / "out.jsonl")) == 5
    assert feature_cache(loaded[0]).images_encoded == 2


def test_segment_objects_get_masks_as_generate_json_prints_them(vae, tmp_path):
    from mlx_paligemma.tasks.detection import ObjectReader, objects_to_json, parse_detections
    from mlx_paligemma.formats.mask_decoder import load_mask_decoder
    from mlx_paligemma.errors import InputError

    _, folder = vae
    text = f"<loc0256><loc0512><loc0768><loc1000>{SEG16} cat ; <loc0000><loc0000><loc0100><loc0100> dog"
    objects = objects_to_json(ObjectReader(str(folder / "vae-oid.npz"))(text, (300, 200)))
    assert "mask" in objects[0] and "mask" not in objects[1]
    decoder = load_mask_decoder(folder / "vae-oid.npz")
    assert objects == objects_to_json(parse_detections(text, (300, 200), mask_decoder=decoder))
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="^cannot load the mask decoder "):
        ObjectReader(str(tmp_path / "bad.npz"))(text, (300, 200))


# The runner with its image reader held at the item whose image is named hold.jpg until the file $RELEASE exists: a
# run over items ending with one cannot end before the test kills it, however fast the machine is.
HELD_RUN = """
import os, sys, time
import mlx_paligemma.batch as batch
load = batch.load_image
def held(source):
    deadline = time.monotonic() + 600  # a bound, never reached: the test kills the run or releases it
    while str(source).endswith("hold.jpg") and not os.path.exists(os.environ["RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return load(source)
batch.load_image = held
sys.exit(batch.main(sys.argv[1:]))
"""


def held_run(data: Path, out: Path, release: Path, *more) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HELD_RUN, *args(data, out, *more)], cwd=ROOT,
                            env={**os.environ, "RELEASE": str(release)}, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out: Path, n: int, process: subprocess.Popen) -> None:
    """Until OUT holds n whole lines (an event, not a time), bounded in case the run is broken."""
    deadline = time.monotonic() + 300
    while (not out.exists() or out.read_bytes().count(b"\n") < n) and process.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()


def test_sigkill_partway_then_rerun_gives_the_same_output(tmp_path):
    data = write_dataset(tmp_path, copies=2)
    shutil.copy(FIXTURES / "images" / "chelsea.jpg", tmp_path / "hold.jpg")
    with open(data, "a") as f:
        f.write(json.dumps({"image": "hold.jpg", "prompt": "caption en"}) + "\n")
    release = tmp_path / "release"
    expected_out = tmp_path / "expected.jsonl"
    release.touch()
    assert main(args(data, expected_out, "--json", "--batch-size", "2")) == 0
    expected = expected_out.read_bytes()
    release.unlink()

    out = tmp_path / "out.jsonl"
    process = held_run(data, out, release, "--json", "--batch-size", "2")
    wait_for_lines(out, 3, process)  # it is now writing lines, somewhere before the held last item
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = out.read_bytes()
    assert 3 <= partial.count(b"\n") < 2 * len(LINES) + 1
    assert expected.startswith(partial[: partial.rfind(b"\n") + 1])
    release.touch()
    process = held_run(data, out, release, "--json", "--batch-size", "2")
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert out.read_bytes() == expected


def test_torn_last_line_and_part_files_are_picked_up(tmp_path, complete, monkeypatch):
    data, expected = complete
    lines = expected.decode().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    # OUT holds 3 items and half of the 4th; part files of an earlier two-process run hold items 6 and 9 (one
    # rank's whole lines and a torn line of its own), and a line of another output that is not ours.
    out.write_text("".join(lines[:3]) + lines[3][:20])
    (tmp_path / "out.jsonl.rank0.part").write_text(f"5\t{lines[5]}")
    (tmp_path / "out.jsonl.rank1.part").write_text(f"8\t{lines[8]}" + f"9\t{lines[9][:10]}")
    (tmp_path / "other.jsonl.rank0.part").write_text(f"4\t{lines[4]}")
    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.batch", *args(data, out, "--json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cut off a torn last line" in r.stderr
    assert out.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.jsonl.rank0.part", "out.jsonl",
                                                          "out.jsonl.settings.json"]
    # A complete OUT: nothing to do, the model is not even loaded, OUT is untouched.
    from mlx_paligemma.formats import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model loaded")))
    assert main(args(data, out, "--json")) == 0
    assert out.read_bytes() == expected


def free_port() -> int:
    """A port nobody listens on (the ring takes it and the next one), so that runs beside this one do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_mlx_launch_write_what_one_does(tmp_path, complete):
    data, expected = complete
    out = tmp_path / "out.jsonl"
    launch = Path(sys.executable).with_name("mlx.launch")
    command = [str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
               "--python", sys.executable, "--", "-m", "mlx_paligemma.batch", *args(data, out, "--json")]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == expected
    assert "[rank 1/2]" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.settings.json"]
    # Resume under mlx.launch: OUT's first lines, and rank 1's part file holding one of its items.
    lines = expected.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    (tmp_path / "out.jsonl.rank1.part").write_text(f"7\t{lines[7]}")
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == expected


@pytest.mark.parametrize("change, message", [
    (["--input", "nowhere.jsonl"], "error: input not found: nowhere.jsonl"),
    (["--batch-size", "0"], "error: argument --batch-size: must be a whole number >= 1, got '0' (see --help)"),
    (["--max-tokens", "0"], "error: max_tokens must be an integer >= 1, got 0"),
    (["--output", "no-folder/out.jsonl"], "error: output folder not found: no-folder"),
    (["--output", "."], "error: --output . is a folder: give a file name, e.g. answers.jsonl"),
    (["--mask-decoder", "vae.npz"], "error: mask decoder not found: vae.npz"),
])
def test_bad_arguments_are_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path)
    # A model that does not exist: each error must come before loading it.
    argv = args(data, tmp_path / "out.jsonl", "--model", "no-model") + change
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines() == [message]


@contextmanager
def unwritable_folder(tmp_path: Path):
    """A folder nobody can make files in, root included (CI runs as root, for whom permission bits do not count):
    a read-only bind mount where root may mount, /proc/self on Linux otherwise, a folder without write permission
    for anyone else."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    elif subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode == 0:
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    elif Path("/proc/self").is_dir():
        yield Path("/proc/self")
    else:
        pytest.skip("running as root without mount or /proc: no folder is unwritable for root here")


def test_unwritable_output_folder_folder_without_prompt_and_another_runs_output(tmp_path, capsys):
    data = write_dataset(tmp_path)
    with unwritable_folder(tmp_path) as locked:
        assert main(args(data, locked / "out.jsonl") + ["--model", "no-model"]) == 1
        message = capsys.readouterr().err.strip().splitlines()
        assert len(message) == 1 and message[0].startswith(f"error: cannot write to {locked}: "), message
        assert not (locked / "out.jsonl").exists()
    assert main(["--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: a folder input needs --prompt"]
    # The output of another run (its first line is another item): refused, untouched.
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1, "image": "x.jpg", "text": "a"}\n{"id": 2')
    before = other.read_bytes()
    assert main(args(data, other) + ["--model", "no-model"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {other} exists and is not the output of this run (it does not begin with the line of item 1 of "
        f"{data}): give a new --output, or remove it"]
    assert other.read_bytes() == before
    # Our own first line but a later line of another input's: refused before the torn tail is cut.
    line = json.dumps({"id": 1, **LINES[0], "text": "a"})
    other.write_text(line + "\n" + '{"id": 9, "image": "x.jpg"}\n{"id"')
    before = other.read_bytes()
    assert main(args(data, other) + ["--model", "no-model"]) == 1
    assert "line 2 is not the output for item 2 of the input" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_beams_logprobs_and_deterministic_runs_equal_the_api(tmp_path, model):
    data = write_dataset(tmp_path)
    good = [line for line in LINES if isinstance(line, dict) and line["image"] in ("chelsea.jpg", "coffee.jpg")]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(line) + "\n" for line in good))
    data = tmp_path / "good.jsonl"
    runs = {"beams": ("--num-beams", "2", "--length-penalty", "0.5"), "logprobs": ("--logprobs", "2"),
            "deterministic": ("--deterministic",)}
    for name, more in runs.items():
        assert main(args(data, tmp_path / f"{name}.jsonl", *more)) == 0
    for item, beams, logprobs, fixed in zip(good, *(read(tmp_path / f"{n}.jsonl") for n in runs)):
        images = [str(tmp_path / item["image"])]
        assert beams["text"] == mp.generate(*model, images, item["prompt"], max_tokens=MAX_TOKENS, num_beams=2,
                                              length_penalty=0.5).text
        alone = mp.generate(*model, images, item["prompt"], max_tokens=MAX_TOKENS, logprobs=2)
        assert logprobs["text"] == alone.text
        assert [t["id"] for t in logprobs["logprobs"]] == alone.tokens
        assert [t["token"] for t in logprobs["logprobs"]] == \
            [piece(model[1].tokenizer, i)["token"] for i in alone.tokens]
        np.testing.assert_allclose([t["logprob"] for t in logprobs["logprobs"]], alone.logprobs, rtol=0, atol=1e-5)
        assert [[a["id"] for a in t["top_logprobs"]] for t in logprobs["logprobs"]] == \
            [[i for i, _ in top] for top in alone.top_logprobs]
        assert fixed["text"] == mp.generate(*model, images, item["prompt"], max_tokens=MAX_TOKENS,
                                            deterministic=True).text
        assert "logprobs" not in beams and "logprobs" not in fixed


def test_logprobs_with_beams(tmp_path, capsys, model):
    """A beam search's tokens come with their log-probabilities (those of generate's), but no alternatives."""
    data = write_dataset(tmp_path)
    assert main(args(data, tmp_path / "out.jsonl", "--num-beams", "2", "--logprobs", "1")) == 1
    assert capsys.readouterr().err.strip().endswith("leave logprobs (top alternatives) at 0")
    assert not (tmp_path / "out.jsonl").exists()
    assert main(args(data, tmp_path / "out.jsonl", "--num-beams", "2", "--logprobs", "0")) == 0
    for line in read(tmp_path / "out.jsonl"):
        if "error" in line:
            continue
        images = line["image"] if isinstance(line["image"], list) else [line["image"]]
        g = mp.generate(*model, [str(data.parent / i) for i in images], line["prompt"], max_tokens=MAX_TOKENS,
                        num_beams=2, logprobs=0)
        assert [t["id"] for t in line["logprobs"]] == g.tokens and line["text"] == g.text
        np.testing.assert_allclose([t["logprob"] for t in line["logprobs"]], g.logprobs, rtol=0, atol=1e-5)
        assert all(t["top_logprobs"] == [] for t in line["logprobs"])


def test_min_score_leaves_out_objects(tmp_path, model):
    """Objects scored as the API's tokens give them; --min-score keeps those at or above it, answers unchanged."""
    from conftest import hand_objects

    shutil.copy(FIXTURES / "images" / "chelsea.jpg", tmp_path / "chelsea.jpg")
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "chelsea.jpg", "prompt": "detect cat ; dog"}) + "\n")
    run = ["--model", str(MODEL), "--input", str(tmp_path / "in.jsonl"), "--json", "--constrain", "--max-tokens",
           "40", "--temperature", "1", "--seed", "2"]
    alone = mp.generate(*model, [str(tmp_path / "chelsea.jpg")], "detect cat ; dog", max_tokens=40,
                        temperature=1.0, seed=2, constrain=True, logprobs=0)
    want = hand_objects(model[1], alone, Image.open(tmp_path / "chelsea.jpg").size)
    scores = sorted({o["score"] for o in want})
    assert len(scores) > 1, "the test needs objects of different scores"
    middle = (scores[0] + scores[1]) / 2
    assert main([*run, "--output", str(tmp_path / "all.jsonl")]) == 0
    assert main([*run, "--output", str(tmp_path / "some.jsonl"), "--min-score", str(middle)]) == 0
    [full], [some] = read(tmp_path / "all.jsonl"), read(tmp_path / "some.jsonl")
    assert full["text"] == some["text"] == alone.text
    assert full["objects"] == want
    assert some["objects"] == [o for o in want if o["score"] >= middle]


def test_a_rerun_with_other_settings_is_refused_or_redone_with_overwrite(tmp_path, capsys):
    """A run records what it was asked beside OUT; a rerun asking otherwise changes nothing and names the
    difference, --overwrite answers every item again, and the same settings resume."""
    data = write_dataset(tmp_path)
    out = tmp_path / "out.jsonl"
    assert main(args(data, out)) == 0
    recorded = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert recorded["settings"]["max_tokens"] == MAX_TOKENS and recorded["prompt"] == "describe en"
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args(data, out, "--max-tokens", "8", "--temperature", "0.5")) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} holds answers to other settings (max_tokens {MAX_TOKENS} -> 8, temperature 0.0 -> 0.5; "
        "out.jsonl.settings.json): rerun with those to resume it, or add --overwrite to answer every item again"]
    assert out.read_bytes() == before
    assert main(args(data, out, "--max-tokens", "8", "--overwrite")) == 0
    lines = [line for line in read(out) if "error" not in line]
    assert max(line["generation_tokens"] for line in lines) == 8 and len(read(out)) == len(LINES)
    assert json.loads((tmp_path / "out.jsonl.settings.json").read_text())["settings"]["max_tokens"] == 8
    assert main(args(data, out, "--max-tokens", "8")) == 0  # the same settings: nothing left to do
    assert "8/8 items (8 were there before this run)" in capsys.readouterr().err


def test_an_earlier_releases_output_is_resumed_with_a_word(complete, tmp_path, capsys):
    """OUT written before runs recorded their settings (its answers named `answer`) is resumed, and says so."""
    data, expected = complete
    out = tmp_path / "out.jsonl"
    old = [json.dumps({("answer" if k == "text" else k): v for k, v in json.loads(line).items()})
           for line in expected.decode().splitlines()[:3]]
    out.write_text("".join(line + "\n" for line in old))
    assert main(args(data, out, "--json")) == 0
    assert f"{out}: its settings were not recorded (an earlier release wrote it): resumed with this run's" in \
        capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[:3] == old and lines[3:] == expected.decode().splitlines()[3:]
