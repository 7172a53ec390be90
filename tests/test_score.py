"""Scoring candidates against transformers' per-token log-probabilities of the same suffix (forward pass with
the candidate as suffix, log-softmax at each label), tests/make_reference.py SCORES."""

import json

import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.generation.scoring import candidate_logprobs, candidate_tokens

SCORES = json.loads((FIXTURES / "reference" / "cases.json").read_text())["scores"]


@pytest.mark.parametrize("i", range(len(SCORES)))
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_match_transformers(loaded, reference, cases, i, batch_size):
    model, processor = loaded
    item = SCORES[i]
    case = cases[item["case"]]
    labels, expected = reference[f"score{i}/labels"], reference[f"score{i}/token_logprobs"]
    ours = candidate_logprobs(model, processor, images_of(case)[0], case["text"][0], item["candidates"],
                          batch_size=batch_size)
    for c, (candidate, values) in enumerate(zip(item["candidates"], ours)):
        n = int((labels[c] >= 0).sum())
        assert candidate_tokens(processor, candidate) == labels[c, :n].tolist()
        np.testing.assert_allclose(values, expected[c, :n], atol=1e-4, rtol=0)
    sums = mp.score(model, processor, images_of(case)[0], case["text"][0], item["candidates"], batch_size=batch_size)
    np.testing.assert_allclose(sums, expected.sum(axis=1), atol=1e-4, rtol=0)


def test_include_eos_false_leaves_eos_out(loaded, reference, cases):
    model, processor = loaded
    item = SCORES[0]
    case = cases[item["case"]]
    expected = reference["score0/token_logprobs"]
    labels = reference["score0/labels"]
    sums = mp.score(model, processor, images_of(case)[0], case["text"][0], item["candidates"], include_eos=False)
    for c, s in enumerate(sums):
        n = int((labels[c] >= 0).sum())
        np.testing.assert_allclose(s, expected[c, : n - 1].sum(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("candidates, message", [([], "non-empty"), ("yes", "non-empty"), ([3], "strings"),
                                                 (["x"] * 1025, "at most")])
def test_bad_candidates_are_one_line(loaded, cases, candidates, message):
    model, processor = loaded
    case = cases["single"]
    with pytest.raises(mp.InputError, match=message):
        mp.score(model, processor, images_of(case)[0], case["text"][0], candidates)
