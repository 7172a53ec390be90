"""The command line, end to end in a subprocess."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES

ROOT = Path(__file__).parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_streams_the_greedy_answer(model_name, loaded, reference):
    _, processor = loaded
    image = FIXTURES / "images" / "chelsea.jpg"
    r = run("-m", "mlx_paligemma.generate", "--model", str(FIXTURES / model_name), "--image", str(image),
            "--prompt", "caption en", "--max-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    eos = processor.tokenizer.eos_id
    tokens = [int(t) for t in reference["single/generated"][0]]
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    assert r.stdout.startswith(processor.decode(tokens) + "\n")
    assert "tokens-per-sec" in r.stdout and "Peak memory" in r.stdout


def test_cli_two_images(model_name):
    images = [str(FIXTURES / "images" / f) for f in ("chelsea.jpg", "coffee.jpg")]
    r = run("-m", "mlx_paligemma.generate", "--model", str(FIXTURES / model_name), "--image", images[0],
            "--image", images[1], "--prompt", "answer en which one shows a cat, first or second?", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr


def test_cli_bad_image_is_one_line(tmp_path, model_name):
    r = run("-m", "mlx_paligemma.generate", "--model", str(FIXTURES / model_name), "--image",
            str(tmp_path / "missing.jpg"), "--prompt", "caption en")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.jpg'}"]


def test_convert_script(tmp_path, model_name):
    r = run("convert.py", "--hf-path", str(FIXTURES / model_name), "--mlx-path", str(tmp_path / "q"), "-q",
            "--q-bits", "8")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert "[convert]" in r.stdout


def test_cli_json_and_draw(tmp_path, model_name):
    import json

    from PIL import Image

    image = FIXTURES / "images" / "chelsea.jpg"
    out = tmp_path / "drawn.png"
    r = run("-m", "mlx_paligemma.generate", "--model", str(FIXTURES / model_name), "--image", str(image),
            "--prompt", "detect cat", "--max-tokens", "8", "--json", "--draw", str(out), "--verbose")
    assert r.returncode == 0, r.stderr
    # A random model finds nothing, but stdout must be exactly one JSON object, and the picture the photo's size.
    answer = json.loads(r.stdout)
    assert isinstance(answer["text"], str) and isinstance(answer["objects"], list)
    assert Image.open(out).size == Image.open(image).size
    assert "Peak memory" in r.stderr


def test_cli_objects_are_scored_and_min_score_leaves_some_out(tmp_path):
    """--json objects carry the scores their tokens' log-probabilities give (as the API's), and --min-score keeps
    those at or above it; a min score outside [0, 1] is one line before the model loads."""
    import json

    from PIL import Image

    import mlx_paligemma as mp
    from conftest import hand_objects

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    settings = ["--max-tokens", "40", "--temperature", "1", "--seed", "2", "--constrain"]
    base = ["-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image), "--prompt",
            "detect cat ; dog", "--json", *settings]
    loaded = mp.load(str(model))
    alone = mp.generate(*loaded, [str(image)], "detect cat ; dog", max_tokens=40, temperature=1.0, seed=2,
                        constrain=True, logprobs=0)
    want = hand_objects(loaded[1], alone, Image.open(image).size)
    scores = sorted({o["score"] for o in want})
    assert len(scores) > 1, "the test needs objects of different scores"
    r = run(*base)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"text": alone.text, "objects": want, "finish_reason": alone.finish_reason,
                                    "prompt_tokens": alone.prompt_tokens, "generation_tokens": len(alone.tokens)}
    middle = (scores[0] + scores[1]) / 2
    r = run(*base, "--min-score", str(middle))
    assert json.loads(r.stdout)["objects"] == [o for o in want if o["score"] >= middle]
    r = run(*base, "--min-score", "1.5")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: min_score must be a number in [0, 1], got 1.5"]


def test_cli_candidates_are_scored_as_the_api_does(tmp_path):
    """--candidates prints each candidate's score (mp.score's, checked against transformers in test_score),
    likeliest first; --json gives the likeliest as the answer; --no-include-eos scores without <eos>."""
    import json

    import mlx_paligemma as mp

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    prompt, candidates = "answer en is there a cat?", ["yes", "no", "a cat"]
    loaded = mp.load(str(model))
    base = ["-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image), "--prompt", prompt,
            "--candidates", *candidates]
    for more, include_eos in (([], True), (["--no-include-eos"], False)):
        want = mp.score(*loaded, [str(image)], prompt, candidates, include_eos=include_eos)
        r = run(*base, *more)
        assert r.returncode == 0, r.stderr
        order = sorted(range(3), key=lambda i: -want[i])
        assert r.stdout.splitlines() == [f"{want[i]:.4f}  {candidates[i]}" for i in order]
        r = run(*base, *more, "--json")
        out = json.loads(r.stdout)
        assert out["text"] == candidates[order[0]] and [c["text"] for c in out["candidates"]] == candidates
        np.testing.assert_allclose([c["logprob"] for c in out["candidates"]], want, rtol=0, atol=1e-5)
    r = run(*base, "--draw", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --candidates scores the given answers as they are: it takes no --draw"]


def test_cli_json_with_logprobs_is_one_object():
    """--json --logprobs K: stdout is one JSON object, the answer with its tokens' values (the API's)."""
    import json

    import mlx_paligemma as mp

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    from mlx_paligemma.processing.tokens import piece

    loaded = mp.load(str(model))
    want = mp.generate(*loaded, [str(image)], "detect cat", max_tokens=8, logprobs=2)
    r = run("-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image), "--prompt", "detect cat",
            "--max-tokens", "8", "--json", "--logprobs", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "objects", "logprobs", "finish_reason", "prompt_tokens", "generation_tokens"}
    assert out["text"] == want.text and out["generation_tokens"] == len(want.tokens) == 8
    # Each token by its id and its text, as the server's logprobs entries give them.
    assert [t["id"] for t in out["logprobs"]] == want.tokens
    assert [(t["token"], t["bytes"]) for t in out["logprobs"]] == \
        [tuple(piece(loaded[1].tokenizer, i).values()) for i in want.tokens]
    np.testing.assert_allclose([t["logprob"] for t in out["logprobs"]], want.logprobs, rtol=0, atol=1e-5)
    assert [[a["id"] for a in t["top_logprobs"]] for t in out["logprobs"]] == \
        [[i for i, _ in top] for top in want.top_logprobs]


# What a failed fetch says: its cause to the person who asked (command lines, Python), nothing to a server's clients.

def fetch_error(url, monkeypatch):
    import pytest

    from mlx_paligemma.errors import InputError
    from mlx_paligemma.processing.images import load_image

    monkeypatch.setenv("MLX_PALIGEMMA_ALLOW_PRIVATE_URLS", "1")
    with pytest.raises(InputError) as e:
        load_image(url)
    return str(e.value)


def test_a_failed_fetch_tells_its_cause(monkeypatch):
    import socket

    from http_targets import serve

    with serve() as base:
        assert fetch_error(f"{base}/missing", monkeypatch).endswith(": HTTP 404 Not Found")
        assert ": not an image (" in fetch_error(f"{base}/hello", monkeypatch)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch_error(f"http://127.0.0.1:{port}/x.jpg", monkeypatch).endswith(
        f": 127.0.0.1:{port} refused the connection")

    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    assert "the name photos.example was not resolved" in fetch_error("http://photos.example/x.jpg", monkeypatch)


def test_a_failed_fetch_is_too_large_or_late(monkeypatch):
    from http_targets import serve
    from mlx_paligemma.errors import InputError
    from mlx_paligemma.processing.fetch import fetch

    monkeypatch.setenv("MLX_PALIGEMMA_ALLOW_PRIVATE_URLS", "1")
    with serve() as base:
        for path, kwargs, said in [("/endless", dict(max_bytes=100_000), "more than 100000 bytes"),
                                   ("/drip", dict(timeout=0.5), "not all of it within 0.5 s")]:
            try:
                fetch(base + path, tell=True, **kwargs)
            except InputError as e:
                assert str(e).endswith(said), e
            else:
                raise AssertionError(f"{path} was fetched")
            try:
                fetch(base + path, **kwargs)  # as the server fetches for its clients: the reason is not told
            except InputError as e:
                assert "the reason is not told" in str(e) and said not in str(e)


# One vocabulary: --model, --data, --output on every command where they mean something, the old names kept.

def parsed(module, argv):
    import importlib

    return vars(importlib.import_module(f"mlx_paligemma.{module}").build_parser().parse_args(argv))


def test_the_same_flags_on_every_command():
    assert parsed("convert", ["--model", "m", "--output", "o"]) == \
        parsed("convert", ["--hf-path", "m", "--mlx-path", "o"])
    assert parsed("export", ["--model", "m", "--output", "o"]) == parsed("export", ["--model", "m", "--out", "o"])
    assert parsed("batch", ["--model", "m", "--data", "d", "--output", "o"]) == \
        parsed("batch", ["--model", "m", "--input", "d", "--output", "o"])
    assert parsed("lora", ["--model", "m", "--fuse", "--output", "f"])["save_path"] == "f"
    assert parsed("lora", ["--model", "m", "--fuse", "--save-path", "f"])["save_path"] == "f"
    assert parsed("evaluate", ["--model", "m", "--data", "d", "--output", "o"])["output"] == "o"
    generate = ["--model", "m", "--image", "i", "--prompt", "p"]
    batch = ["--model", "m", "--data", "d", "--output", "o"]
    assert parsed("generate", generate + ["--temp", "0.7"])["temperature"] == 0.7
    for module, base in (("generate", generate), ("batch", batch)):  # batch samples as generate does
        got = parsed(module, base + ["--min-p", "0.1", "--repetition-penalty", "1.1", "--repetition-context-size", "9",
                                     "--top-k", "5", "--top-p", "0.9", "--temp", "0.5", "--seed", "3"])
        assert (got["min_p"], got["repetition_penalty"], got["repetition_context_size"], got["top_k"], got["top_p"],
                got["temperature"], got["seed"]) == (0.1, 1.1, 9, 5, 0.9, 0.5, 3)


def test_no_abbreviations_and_the_flag_meant():
    import importlib

    import pytest

    from mlx_paligemma.errors import InputError

    base = ["--model", "m", "--image", "i", "--prompt", "p"]
    for wrong, meant in [("--adapter-file", "--adapter-path"), ("--max-new-tokens", "--max-tokens"),
                         ("--top_p", "--top-p"), ("--do-sample", "--temperature"), ("--tempreature", "--temperature"),
                         ("--exclude-eos", "--no-include-eos"), ("--batch-invariant", "--deterministic")]:
        with pytest.raises(InputError, match=f"unrecognized arguments: {wrong} x \\(did you mean {meant}\\?\\)"):
            parsed("generate", base + [wrong, "x"])
    with pytest.raises(InputError, match=r"unrecognized arguments: --out x \(did you mean --output\?\)"):
        parsed("convert", ["--model", "m", "--output", "o", "--out", "x"])
    for module in ("generate", "batch", "evaluate", "lora", "convert", "export", "server.__main__"):
        assert importlib.import_module(f"mlx_paligemma.{module}").build_parser().allow_abbrev is False


def test_package_lists_its_commands_and_plurals():
    from mlx_paligemma.cli import plural

    r = run("-m", "mlx_paligemma")
    assert r.returncode == 0
    assert all(f"python -m mlx_paligemma.{c} " in r.stdout
               for c in ("generate", "batch", "server", "evaluate", "lora", "convert", "export"))
    r = run("-m", "mlx_paligemma", "nope")
    assert r.returncode == 1 and r.stderr.startswith("error: no command 'nope'")
    assert (plural(1, "error"), plural(0, "error"), plural(2, "object")) == ("1 error", "0 errors", "2 objects")


def test_a_missing_extra_stops_a_command_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib
    import json

    from mlx_paligemma.formats import loading

    evaluate, generate = (importlib.import_module(f"mlx_paligemma.{m}") for m in ("evaluate", "generate"))

    for blocked in ("pycocotools.cocoeval", "llguidance"):  # an import of them fails, as when not installed
        monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model loaded")))
    (tmp_path / "c.jpg").write_bytes((FIXTURES / "images" / "chelsea.jpg").read_bytes())
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "c.jpg", "prefix": "detect cat", "suffix": "x"}) + "\n")
    assert evaluate.main(["--model", "m", "--data", str(tmp_path / "d.jsonl")]) == 1
    assert capsys.readouterr().err == \
        'error: pycocotools is needed for detection metrics: pip install "mlx-paligemma[eval]"\n'
    assert generate.main(["--model", "m", "--image", str(tmp_path / "c.jpg"), "--prompt", "x", "--regex", "a"]) == 1
    assert capsys.readouterr().err == \
        'error: llguidance is needed for structured output: pip install "mlx-paligemma[structured]"\n'


@pytest.mark.parametrize("flags, named", [(["--regex", "a+"], "--regex"), (["--num-beams", "2"], "--num-beams"),
                                          (["--constrain"], "--constrain")])
def test_candidates_refuse_the_flags_they_would_ignore(flags, named):
    """--candidates scores the given answers: a constraint or a way of choosing among answers is refused in one
    line before the model loads, not silently ignored."""
    r = run("-m", "mlx_paligemma.generate", "--model", str(FIXTURES / "paligemma2-tiny"), "--image",
            str(FIXTURES / "images" / "chelsea.jpg"), "--prompt", "answer en is there a cat?", "--candidates", "yes",
            "no", *flags)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: --candidates scores the given answers as they are: it takes no {named}"]


def test_generate_answers_with_the_base_and_each_adapter(tmp_path):
    """generate --adapter NAME=PATH, as batch's: the base and each adapter answer the prompt, side by side, each
    what that adapter loaded alone gives; with --json a record a line naming its adapter."""
    import json

    from test_adapters import PROMPTS, texts_alone, train_adapters

    trained = train_adapters("paligemma-tiny", False, tmp_path)
    alone = texts_alone(trained)
    image, prompt = PROMPTS[0]
    command = ["-m", "mlx_paligemma.generate", "--model", trained["base"], "--image", image, "--prompt", prompt,
               "--max-tokens", "8", *(f"--adapter={a}={f}" for a, f in trained["folders"].items())]
    r = run(*command)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{name or 'base'}: {alone[name][0]}" for name in [None, "cats", "dogs"]]
    r = run(*command, "--json")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(line["adapter"], line["text"]) for line in lines] == [(n, alone[n][0]) for n in [None, "cats", "dogs"]]
    assert all(line["generation_tokens"] > 0 and line["finish_reason"] for line in lines)
    r = run(*command, "--draw", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --adapter answers with the base and each adapter: it takes no --draw (one answer's)"]
