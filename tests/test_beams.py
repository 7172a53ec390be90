"""Beam search against transformers' generate(num_beams=...).text on the same weights: tokens and sequence scores.

The references (tests/make_reference.py, BEAMS) end most searches on a token the random model says often instead
of <eos>, so hypotheses finish at several lengths and the length penalty, early_stopping and
num_return_sequences decide what comes back."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.generation.engine import Engine

BEAMS = json.loads((FIXTURES / "reference" / "cases.json").read_text())["beams"]
SETTINGS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")


def run_beams(model, processor, eos, jobs, batch_size=8, extra=()):
    """jobs: (images, prompt, settings); extra: greedy prompts sharing the steps. The engine's results by job."""
    engine = Engine(model, processor, batch_size=batch_size)
    engine.vocab = replace(engine.vocab, eos_id=eos)
    uids = [engine.submit(images, prompt, max_tokens=12, **settings) for images, prompt, settings in jobs]
    for images, prompt in extra:
        engine.submit(images, prompt, max_tokens=12)
    results = {}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                if out.sequences is not None:
                    results[out.uid] = out
    return [results[u] for u in uids]


def padded(sequences, width, eos):
    return np.array([s.tokens + [eos] * (width - len(s.tokens)) for s in sequences])


@pytest.mark.parametrize("i", range(len(BEAMS)))
def test_beams_match_transformers(loaded, reference, cases, i):
    model, processor = loaded
    beam = BEAMS[i]
    case = cases[beam["case"]]
    settings = {k: beam[k] for k in SETTINGS if k in beam}
    eos = int(reference[f"beam{i}/eos"])
    jobs = [(images, text, settings) for images, text in zip(images_of(case), case["text"])]
    results = run_beams(model, processor, eos, jobs)
    expected = reference[f"beam{i}/sequences"]
    scores = reference[f"beam{i}/scores"]
    count = beam.get("num_return_sequences", 1)
    ours = np.concatenate([padded(r.sequences, expected.shape[1], eos) for r in results])
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_allclose([s.score for r in results for s in r.sequences], scores, atol=5e-5, rtol=0)
    assert all(len(r.sequences) == count for r in results)
    # Each token's own log-probability comes with it: summed and length-penalised, transformers' score again.
    penalty = beam.get("length_penalty", 1.0)
    assert all(len(s.logprobs) == len(s.tokens) for r in results for s in r.sequences)
    np.testing.assert_allclose([math.fsum(s.logprobs) / len(s.tokens) ** penalty for r in results
                                for s in r.sequences], scores, atol=5e-5, rtol=0)


def test_beams_share_steps_with_other_rows(loaded, reference, cases):
    """Beams of two prompts and greedy rows in one batch give what each beam search gives alone."""
    model, processor = loaded
    i = next(i for i, b in enumerate(BEAMS) if b["case"] == "two_images" and b.get("num_return_sequences", 1) > 1)
    beam, single = BEAMS[i], cases["single"]
    settings = {k: beam[k] for k in SETTINGS if k in beam}
    eos = int(reference[f"beam{i}/eos"])
    two = cases["two_images"]
    jobs = [(images_of(two)[0], two["text"][0], settings), (images_of(single)[0], single["text"][0], settings)]
    together = run_beams(model, processor, eos, jobs, extra=[(images_of(single)[0], "caption es")] * 2)
    alone = [run_beams(model, processor, eos, [job])[0] for job in jobs]
    expected = reference[f"beam{i}/sequences"]
    np.testing.assert_array_equal(padded(together[0].sequences, expected.shape[1], eos), expected)
    for t, a in zip(together, alone):
        assert [s.tokens for s in t.sequences] == [s.tokens for s in a.sequences]


def test_generate_beams_default_eos(loaded, reference, cases):
    """The API: generate(num_beams=2).text returns transformers' first sequence as text; with num_return_sequences
    the texts best first."""
    model, processor = loaded
    i = next(i for i, b in enumerate(BEAMS) if "eos_at" not in b)
    case = cases[BEAMS[i]["case"]]
    expected = [t for t in reference[f"beam{i}/sequences"][0].tolist() if t != processor.tokenizer.eos_id]
    text = mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=12,
                       num_beams=BEAMS[i]["num_beams"]).text
    assert text == processor.tokenizer.decode(expected)
    texts = mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=12, num_beams=2,
                        num_return_sequences=2).texts
    assert len(texts) == 2 and texts[0] == text


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=2, temperature=0.7), "temperature"),
    (dict(num_beams=2, stop=["x"]), "stop"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
])
def test_bad_beam_settings_are_one_line(loaded, cases, settings, message):
    model, processor = loaded
    case = cases["single"]
    with pytest.raises(mp.InputError, match=message):
        mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=4, **settings).text
