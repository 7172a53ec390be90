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
    assert isinstance(answer["answer"], str) and isinstance(answer["objects"], list)
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
    assert json.loads(r.stdout) == {"answer": alone.text, "objects": want, "finish_reason": alone.finish_reason,
                                    "prompt_tokens": alone.prompt_tokens, "generation_tokens": len(alone.tokens)}
    middle = (scores[0] + scores[1]) / 2
    r = run(*base, "--min-score", str(middle))
    assert json.loads(r.stdout)["objects"] == [o for o in want if o["score"] >= middle]
    r = run(*base, "--min-score", "1.5")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: min_score must be a number in [0, 1], got 1.5"]


def test_cli_candidates_are_scored_as_the_api_does(tmp_path):
    """--candidates prints each candidate's score (mp.score's, checked against transformers in test_score),
    likeliest first; --json gives the likeliest as the answer; --exclude-eos scores without <eos>."""
    import json

    import mlx_paligemma as mp

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    prompt, candidates = "answer en is there a cat?", ["yes", "no", "a cat"]
    loaded = mp.load(str(model))
    base = ["-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image), "--prompt", prompt,
            "--candidates", *candidates]
    for more, include_eos in (([], True), (["--exclude-eos"], False)):
        want = mp.score(*loaded, [str(image)], prompt, candidates, include_eos=include_eos)
        r = run(*base, *more)
        assert r.returncode == 0, r.stderr
        order = sorted(range(3), key=lambda i: -want[i])
        assert r.stdout.splitlines() == [f"{want[i]:.4f}  {candidates[i]}" for i in order]
        r = run(*base, *more, "--json")
        out = json.loads(r.stdout)
        assert out["answer"] == candidates[order[0]] and [c["text"] for c in out["candidates"]] == candidates
        np.testing.assert_allclose([c["logprob"] for c in out["candidates"]], want, rtol=0, atol=1e-5)
    r = run(*base, "--draw", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --candidates scores the given answers: it takes no --draw or --logprobs"]


def test_cli_json_with_logprobs_is_one_object():
    """--json --logprobs K: stdout is one JSON object, the answer with its tokens' values (the API's)."""
    import json

    import mlx_paligemma as mp

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    want = mp.generate(*mp.load(str(model)), [str(image)], "detect cat", max_tokens=8, logprobs=2)
    r = run("-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image), "--prompt", "detect cat",
            "--max-tokens", "8", "--json", "--logprobs", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"answer", "objects", "logprobs", "finish_reason", "prompt_tokens", "generation_tokens"}
    assert out["answer"] == want.text and out["generation_tokens"] == len(want.tokens) == 8
    assert [t["token"] for t in out["logprobs"]] == want.tokens
    np.testing.assert_allclose([t["logprob"] for t in out["logprobs"]], want.logprobs, rtol=0, atol=1e-5)
    assert [[a["token"] for a in t["top_logprobs"]] for t in out["logprobs"]] == \
        [[i for i, _ in top] for top in want.top_logprobs]


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
