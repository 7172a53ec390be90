"""Each token's log-probability, and its top alternatives, against transformers' log-softmax of generate's
output_logits on the same weights (tests/make_reference.py), to float32 rounding."""

import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import images_of
from mlx_paligemma.api import Generation
from mlx_paligemma.generation.engine import Engine

GENERATION = ["single", "gray", "rgba", "odd", "two_images"]
K = 5


def check(gen, reference, name, row):
    expected_tokens = reference[f"{name}/generated"][row].tolist()
    assert gen.tokens == expected_tokens  # every one: the reference's answers hold no eos within max_tokens
    n = len(expected_tokens)
    np.testing.assert_allclose(gen.logprobs, reference[f"{name}/token_logprobs"][row, :n], atol=1e-4, rtol=0)
    ours_values = np.array([[v for _, v in top] for top in gen.top_logprobs])
    np.testing.assert_allclose(ours_values, reference[f"{name}/top_logprobs"][row, :n], atol=1e-4, rtol=0)
    assert [[i for i, _ in top] for top in gen.top_logprobs] == reference[f"{name}/top_ids"][row, :n].tolist()


@pytest.mark.parametrize("name", GENERATION)
def test_logprobs_match_transformers(loaded, reference, cases, name):
    model, processor = loaded
    case = cases[name]
    gen = mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=12, logprobs=K)
    assert isinstance(gen, Generation)
    check(gen, reference, name, 0)


def test_batch_logprobs_match_transformers_and_stream(loaded, reference, cases):
    """batch_generate rows (sharing steps, left-padded at prefill) carry the same values; stream_generate's
    responses too (alone, not bitwise: float rounding follows the batch's shape outside deterministic mode)."""
    model, processor = loaded
    case = cases["batch"]
    gens = mp.batch_generate(model, processor, images_of(case), case["text"], max_tokens=12, logprobs=K)
    for row, gen in enumerate(gens):
        check(gen, reference, "batch", row)
    streamed = list(mp.stream_generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=12,
                                       logprobs=2))
    assert [r.token for r in streamed] == gens[0].tokens
    np.testing.assert_allclose([r.logprob for r in streamed], gens[0].logprobs, atol=1e-4, rtol=0)
    assert [[i for i, _ in r.top_logprobs[0]] for r in streamed] == [[i for i, _ in t[:2]] for t in gens[0].top_logprobs]


def test_greedy_rows_where_some_want_logprobs(loaded, reference, cases):
    """Greedy rows of one batch where only some ask for log-probabilities (the engine computes those rows' softmax
    alone): each asking row's values are transformers', the others carry none, and every row's tokens are its own."""
    model, processor = loaded
    case = cases["batch"]
    engine = Engine(model, processor, batch_size=len(case["text"]))
    asked = [i % 2 == 1 for i in range(len(case["text"]))]
    uids = [engine.submit(image, text, max_tokens=12, logprobs=0 if want else None)
            for image, text, want in zip(images_of(case), case["text"], asked)]
    results = {}
    with engine.running():
        while engine.has_work:
            results.update({o.uid: o.result for o in engine.step() if o.result is not None})
    assert len(asked) > 1 and any(asked) and not all(asked)
    for row, (uid, want) in enumerate(zip(uids, asked)):
        result = results[uid]
        expected = reference["batch/generated"][row].tolist()
        assert result.tokens == expected
        if want:
            np.testing.assert_allclose(result.logprobs, reference["batch/token_logprobs"][row, :len(expected)],
                                       atol=1e-4, rtol=0)
        else:
            assert result.logprobs == []


def test_logprobs_zero_gives_tokens_own_only(loaded, cases):
    model, processor = loaded
    case = cases["single"]
    gen = mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=3, logprobs=0)
    assert len(gen.logprobs) == 3 and gen.top_logprobs == []
    assert all(lp <= 0 for lp in gen.logprobs)


def test_sampled_token_logprob_is_of_the_model_distribution(loaded, cases):
    """At temperature 1 with top_k the token is drawn from the filtered distribution, and the value handed out
    is the model's (unfiltered) log-probability of the token drawn: it is among the top-k alternatives."""
    model, processor = loaded
    case = cases["single"]
    gen = mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=8, temperature=1.0,
                      top_k=3, seed=0, logprobs=3)
    for token, lp, top in zip(gen.tokens, gen.logprobs, gen.top_logprobs):
        assert (token, lp) in top


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_logprobs_is_one_line(loaded, cases, value):
    model, processor = loaded
    case = cases["single"]
    with pytest.raises(mp.InputError, match="logprobs"):
        mp.generate(model, processor, images_of(case)[0], case["text"][0], max_tokens=2, logprobs=value)
