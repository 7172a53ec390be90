"""big_vision's best_of_n: n seeded samples of one prompt (rows sharing its prefill), the likeliest kept.

The samples are what the same prompt gives alone with the seeds seed, seed+1, ... (each checked against mlx-lm's
sampler and transformers' log-probabilities elsewhere), and the order is big_vision's score: the summed
log-probability of each answer's tokens, <eos> included."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.generation.engine import Engine

SAMPLED = dict(max_tokens=10, temperature=1.0, seed=3)
N = 4


def samples(model, processor, image, prompt, **kw):
    return [mp.generate(model, processor, image, prompt, logprobs=0, **{**SAMPLED, **kw, "seed": SAMPLED["seed"] + i})
            for i in range(N)]


def test_best_of_keeps_the_likeliest_of_its_seeded_samples(loaded, cases):
    model, processor = loaded
    case = cases["single"]
    image, prompt = images_of(case)[0], case["text"][0]
    alone = samples(model, processor, image, prompt)
    assert len({g.text for g in alone}) > 1, "the samples must differ for the test to mean something"
    best = mp.generate(model, processor, image, prompt, best_of=N, num_return_sequences=N, logprobs=0, **SAMPLED)
    order = sorted(range(N), key=lambda i: -math.fsum(alone[i].logprobs))
    assert [s.tokens for s in best.sequences] == [alone[i].tokens for i in order]
    for s, i in zip(best.sequences, order):
        assert s.text == alone[i].text
        np.testing.assert_allclose(s.logprobs, alone[i].logprobs, rtol=0, atol=1e-5)
        assert s.score == pytest.approx(math.fsum(s.logprobs), abs=1e-9)
    assert best.text == alone[order[0]].text and best.tokens == alone[order[0]].tokens
    assert mp.generate(model, processor, image, prompt, best_of=N, **SAMPLED).text == alone[order[0]].text


def test_best_of_shares_steps_with_other_rows(loaded, cases):
    """A best_of request beside greedy prompts in one batch gives what it gives alone."""
    model, processor = loaded
    case = cases["single"]
    image, prompt = images_of(case)[0], case["text"][0]

    def run(extra):
        engine = Engine(model, processor, batch_size=8)
        uid = engine.submit(image, prompt, best_of=N, num_return_sequences=N, **SAMPLED)
        for text in extra:
            engine.submit(image, text, max_tokens=10)
        with engine.running():
            while engine.has_work:
                for out in engine.step():
                    if out.uid == uid and out.sequences is not None:
                        result = out
        return [s.tokens for s in result.sequences]

    assert run(["caption es", "answer en what is this?"]) == run([])


def test_stop_strings_end_a_sample(loaded, cases):
    model, processor = loaded
    case = cases["single"]
    image, prompt = images_of(case)[0], case["text"][0]
    first = samples(model, processor, image, prompt)[0].text
    stop = first[len(first) // 2 : len(first) // 2 + 2]
    assert stop.strip(), "the test needs a stop string inside the first sample"
    best = mp.generate(model, processor, image, prompt, best_of=N, num_return_sequences=N, logprobs=0, stop=[stop],
                       **SAMPLED)
    assert all(stop not in s.text for s in best.sequences)
    assert any(s.finish_reason == "stop" and s.tokens[-1] != processor.tokenizer.eos_id for s in best.sequences)


@pytest.mark.parametrize("settings, message", [
    (dict(best_of=0), "best_of must be an integer >= 1"),
    (dict(best_of=65), "at most 64"),
    (dict(best_of=2, temperature=0.0), "give a temperature > 0"),
    (dict(best_of=2, num_beams=2, temperature=0.0), "not both"),
    (dict(best_of=2, logprobs=2), "no alternatives"),
    (dict(best_of=2, num_return_sequences=3), "at most num_beams (1) or best_of (2)"),
])
def test_bad_best_of_is_one_line(loaded, cases, settings, message):
    model, processor = loaded
    case = cases["single"]
    with pytest.raises(mp.InputError) as e:
        mp.generate(model, processor, images_of(case)[0], case["text"][0], **{**SAMPLED, **settings}).text
    assert message in str(e.value) and "\n" not in str(e.value)


def test_generate_and_batch_command_lines(tmp_path):
    """--best-of on generate and batch answers what the API does."""
    import shutil

    from mlx_paligemma.batch import main as batch_main

    model, image = FIXTURES / "paligemma2-tiny", FIXTURES / "images" / "chelsea.jpg"
    want = mp.generate(*mp.load(str(model)), [str(image)], "caption en", best_of=3, **SAMPLED).text
    flags = ["--max-tokens", "10", "--temperature", "1", "--seed", "3", "--best-of", "3"]
    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.generate", "--model", str(model), "--image", str(image),
                        "--prompt", "caption en", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    shutil.copy(image, tmp_path / "chelsea.jpg")
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "chelsea.jpg", "prompt": "caption en"}) + "\n")
    # The batch runner seeds item i with seed + i: item 0 is seeded as the call above.
    assert batch_main(["--model", str(model), "--input", str(tmp_path / "in.jsonl"), "--output",
                       str(tmp_path / "out.jsonl"), *flags]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["text"] == want
