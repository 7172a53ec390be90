"""deterministic=True: each request's tokens and log-probabilities are bitwise what it gets alone, whatever
shares the steps (greedy, seeded sampling, beams). Outside that mode, what holds is pinned here too: a seeded
row draws the same random numbers in any batch (its own key), its log-probabilities agree with the row alone to
float rounding, and a batch run again is bitwise the same; a token can still flip where two candidates are within
rounding of each other."""

import numpy as np
import pytest

from conftest import FIXTURES
from mlx_paligemma.generation.engine import Engine

IMAGES = [str(FIXTURES / "images" / f) for f in ("chelsea.jpg", "coffee.jpg", "gray.png", "odd.png")]
# What is checked, and what shares the steps with it: prompts of several lengths, one with two images, a beam
# search, seeded and greedy rows.
CHECKED = [
    (IMAGES[0], "caption en", dict()),
    (IMAGES[1], "answer en what is in the cup on the table?", dict(temperature=0.8, top_p=0.9, seed=3)),
    ([IMAGES[0], IMAGES[1]], "answer en which one shows a cat, first or second?", dict(temperature=1.0, seed=11)),
    (IMAGES[2], "caption en", dict(num_beams=3, num_return_sequences=2)),
]
OTHERS = [(IMAGES[3], "detect cat ; dog", dict(temperature=0.7, seed=5)), (IMAGES[2], "ocr", dict()),
          (IMAGES[1], "describe en in many words please", dict(top_k=5, temperature=1.0, seed=1))]
TOKENS = 10


def run(model, processor, jobs, batch_size=8, deterministic=True):
    engine = Engine(model, processor, batch_size=batch_size, deterministic=deterministic)
    uids = [engine.submit(images, prompt, max_tokens=TOKENS, **{"logprobs": 0, **settings})
            for images, prompt, settings in jobs]
    got = {u: [] for u in uids}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                got[out.uid].append((out.token, out.logprob) if out.sequences is None else
                                    [(s.tokens, s.score) for s in out.sequences])
    return [got[u] for u in uids]


@pytest.fixture(scope="module")
def alone(loaded):
    model, processor = loaded
    return [run(model, processor, [job])[0] for job in CHECKED]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 8])
def test_rows_bitwise_equal_alone_whatever_shares_the_steps(loaded, alone, batch_size):
    model, processor = loaded
    jobs = [OTHERS[0], CHECKED[0], OTHERS[1], CHECKED[1], CHECKED[2], OTHERS[2], CHECKED[3]]
    results = run(model, processor, jobs, batch_size=batch_size)
    checked = [r for job, r in zip(jobs, results) if job in CHECKED]
    for got, expected in zip(checked, alone):
        assert got == expected  # tokens and float log-probabilities (beam scores), compared exactly


def test_deterministic_alone_equals_default_alone_for_one_image(loaded, alone):
    """Alone, with one image, the mode computes exactly what the default engine computes."""
    model, processor = loaded
    for job, expected in zip(CHECKED, alone):
        if isinstance(job[0], str):
            assert run(model, processor, [job], deterministic=False)[0] == expected


def test_default_mode_seeded_rows(loaded, alone):
    """Without the mode: a batch run twice is bitwise the same; each row's tokens are those it gets alone (on
    these prompts no two candidates come within rounding of each other, where a token could flip) and its
    log-probabilities agree with the row alone within float rounding."""
    model, processor = loaded
    jobs = [OTHERS[0], CHECKED[1], OTHERS[2], CHECKED[2], CHECKED[0]]
    first = run(model, processor, jobs, deterministic=False)
    assert run(model, processor, jobs, deterministic=False) == first
    checked = [(got, alone[CHECKED.index(job)]) for job, got in zip(jobs, first) if job in CHECKED]
    assert len(checked) == 3
    for got, expected in checked:
        assert len(got) == len(expected) == TOKENS
        assert [t for t, _ in got] == [t for t, _ in expected]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in expected], atol=1e-4, rtol=0)
