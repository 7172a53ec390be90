"""The prefill in pieces: the image features, then each layer's blocks of queries and the layer. Evaluated piece
by piece it gives the numbers of one pass, bit for bit, and transformers' logits; the engine gives a prefill up
between two pieces when its owner says so (a cancelled request, a shutdown), and the rows then wait again, whole."""

import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import images_of
from mlx_paligemma.generation.engine import Engine
from mlx_paligemma.models import language

SMALL_CHUNK = 8  # queries per attention block in these tests: prompts of ~40 tokens then take several blocks


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(language, "ATTENTION_CHUNK", SMALL_CHUNK)


def pieces(model, length: int, images: int) -> int:
    """What `between` sees in a prefill of `length` tokens: the image features once, then per layer each block of
    queries and the layer's output."""
    layers = len(model.language_model.model.layers)
    return (1 if images else 0) + layers * (math.ceil(length / language.ATTENTION_CHUNK) + 1)


@pytest.mark.parametrize("name", ["single", "two_images", "batch"])
def test_pieces_give_the_numbers_of_one_pass_and_of_transformers(loaded, reference, small_chunks, name):
    model, _ = loaded
    ids, pixels = mx.array(reference[f"{name}/input_ids"]), mx.array(reference[f"{name}/pixel_values"])
    mask = mx.array(reference[f"{name}/attention_mask"])
    types = mx.array(reference[f"{name}/token_type_ids"])
    one_pass = model(ids, pixels, attention_mask=mask, token_type_ids=types)
    mx.eval(one_pass)
    seen = []

    def between(piece):
        mx.eval(piece)
        seen.append(piece.shape)

    pieced = model(ids, pixels, attention_mask=mask, token_type_ids=types, between=between)
    assert len(seen) == pieces(model, ids.shape[1], pixels.shape[0]) > 2 * len(model.language_model.model.layers)
    np.testing.assert_array_equal(np.array(pieced), np.array(one_pass))
    real = np.array(mask).astype(bool)
    expected = reference[f"{name}/logits"]
    np.testing.assert_allclose(np.array(pieced)[real], expected[real], atol=1e-4, rtol=0)


def generate(model, processor, cases, interrupt=None, **settings):
    """Tokens and log-probabilities of every prompt of the batch case (and the two-image one), by uid."""
    engine = Engine(model, processor, batch_size=4)
    engine.interrupt = interrupt
    for name in ("batch", "two_images"):
        for images, text in zip(images_of(cases[name]), cases[name]["text"]):
            engine.submit(images, text, max_tokens=6, **settings)
    out = {}
    with engine.running():
        for _ in range(200):
            if not engine.has_work:
                break
            for o in engine.step():
                sequences = [(s.tokens, s.logprobs) for s in o.sequences or ()]  # a beam search's, at its end
                out.setdefault(o.uid, []).append((o.token, o.logprob, tuple(o.top_logprobs or ()), sequences))
    assert not engine.has_work
    return out


@pytest.mark.parametrize("settings", [{"logprobs": 2}, {"num_beams": 2},
                                      {"n": 2, "temperature": 1.0, "seed": 3, "logprobs": 2}],
                         ids=["greedy", "beams", "n"])
def test_engine_asked_between_pieces_answers_as_one_pass(loaded, cases, small_chunks, settings):
    model, processor = loaded
    asked = []
    pieced = generate(model, processor, cases, lambda uids: asked.append(set(uids)) or False, **settings)
    assert len(asked) > 4 and set.union(*asked) == set(pieced)  # every request's prefill was looked at
    assert pieced == generate(model, processor, cases, **settings)


def test_an_interrupted_prefill_waits_again_and_then_answers_the_same(loaded, cases, small_chunks):
    model, processor = loaded
    case = cases["two_images"]
    (images,), (text,) = images_of(case), case["text"]

    def run(interrupt_at=None):
        engine = Engine(model, processor, batch_size=2)
        calls = []

        def interrupt(uids):
            calls.append(uids)
            return len(calls) == interrupt_at

        engine.interrupt = interrupt
        uid = engine.submit(images, text, max_tokens=5, logprobs=1)
        tokens = []
        with engine.running():
            if interrupt_at is not None:
                assert engine.step() == []  # given up at the chosen piece: nothing decoded, the row waits again
                assert len(calls) == interrupt_at and [r.uid for r in engine.waiting] == [uid] and not engine.batches
            for _ in range(50):
                if not engine.has_work:
                    break
                tokens += [(o.token, o.logprob) for o in engine.step()]
        return tokens, len(calls)

    alone, calls = run()
    assert calls == pieces(model, len(processor(images=[images], text=text)["input_ids"][0]), 2)
    for at in (1, 2, calls):  # after the features, within the first layer, after the last piece
        assert run(at)[0] == alone


def test_a_cancelled_request_in_a_prefill_is_given_up_within_a_piece(loaded, cases, small_chunks):
    """The owner of the engine (the server's worker) cancels between steps; during a prefill it answers `interrupt`
    with what it was told meanwhile. The request is then cancelled before any of its tokens."""
    model, processor = loaded
    case = cases["single"]
    engine = Engine(model, processor, batch_size=2)
    (images,), (text,) = images_of(case), case["text"]
    victim = engine.submit(images, text, max_tokens=5)
    calls = []
    engine.interrupt = lambda uids: calls.append(uids) or len(calls) >= 3
    with engine.running():
        assert engine.step() == [] and len(calls) == 3
        engine.cancel(victim)
        assert not engine.has_work
