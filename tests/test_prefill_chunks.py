"""The prefill in pieces (generation/prefill.py): one image's encoding, one block of a layer's tokens. Its numbers
are one pass's and transformers'; the engine's answers do not depend on how many steps a prefill took; a running
row gets its token at every step while a long prompt is prefilled beside it; a cancelled prefill is dropped at
once."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import images_of
from mlx_paligemma.generation import prefill as prefill_module
from mlx_paligemma.errors import InputError
from mlx_paligemma.generation.engine import Engine
from mlx_paligemma.generation.features import FeatureCache
from mlx_paligemma.generation.prefill import Prefill
from mlx_paligemma.generation.request import Request
from mlx_paligemma.generation.settings import Settings
from mlx_paligemma.generation.strategies import strategy_for

SMALL_BLOCK = 8  # tokens a piece in these tests: prompts of ~40 tokens then take several blocks


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(prefill_module, "TOKEN_BLOCK", SMALL_BLOCK)


@pytest.mark.parametrize("name", ["single", "two_images", "batch"])
def test_pieces_give_the_logits_of_one_pass_and_of_transformers(loaded, reference, small_blocks, name):
    model, processor = loaded
    ids, pixels = np.array(reference[f"{name}/input_ids"]), np.array(reference[f"{name}/pixel_values"])
    mask = np.array(reference[f"{name}/attention_mask"]).astype(bool)
    one_pass = model(mx.array(ids), mx.array(pixels), attention_mask=mx.array(mask.astype(np.int32)),
                     token_type_ids=mx.array(reference[f"{name}/token_type_ids"]))[:, -1]
    per_row = len(pixels) // len(ids)
    engine = Engine(model, processor, batch_size=len(ids))
    rows = []
    for i, (row, keep) in enumerate(zip(ids, mask)):
        request = Request(row[keep].tolist(), pixels[i * per_row : (i + 1) * per_row], settings=Settings())
        rows += strategy_for(engine.vocab, i, request).rows
    prefill = Prefill(model, rows, FeatureCache(), 0, None, 64)
    pieces = 0
    while not prefill.done:
        prefill.advance()
        pieces += 1
    layers = len(model.language_model.model.layers)
    blocks = -(-ids.shape[1] // SMALL_BLOCK)
    assert pieces == len(pixels) + layers * (2 * blocks + 1) + 1
    np.testing.assert_allclose(np.array(prefill.logits), np.array(one_pass), atol=1e-5, rtol=0)
    expected = reference[f"{name}/logits"][:, -1]
    np.testing.assert_allclose(np.array(prefill.logits), expected, atol=1e-4, rtol=0)


def generate(model, processor, cases, budget=None, **settings):
    """Tokens and log-probabilities of every prompt of the batch case (and the two-image one), by uid, and the
    number of steps taken."""
    engine = Engine(model, processor, batch_size=4, **({} if budget is None else {"prefill_budget": budget}))
    for name in ("batch", "two_images"):
        for images, text in zip(images_of(cases[name]), cases[name]["text"]):
            engine.submit(images, text, max_tokens=6, **settings)
    out = {}
    with engine.running():
        for _ in range(500):
            if not engine.has_work:
                break
            for o in engine.step():
                sequences = [(s.tokens, s.logprobs) for s in o.sequences or ()]  # a beam search's, at its end
                out.setdefault(o.uid, []).append((o.token, o.logprob, tuple(o.top_logprobs or ()), sequences))
    assert not engine.has_work
    return out, engine.steps


@pytest.mark.parametrize("settings", [{"logprobs": 2}, {"num_beams": 2},
                                      {"n": 2, "temperature": 1.0, "seed": 3, "logprobs": 2}],
                         ids=["greedy", "beams", "n"])
def test_a_prefill_over_many_steps_answers_as_in_one(loaded, cases, small_blocks, settings):
    model, processor = loaded
    pieced, steps = generate(model, processor, cases, budget=0, **settings)
    whole, whole_steps = generate(model, processor, cases, budget=60, **settings)
    assert steps > whole_steps  # a piece a step beside running rows: the prefills were spread over more steps
    assert pieced == whole


def test_a_running_row_gets_a_token_every_step_while_a_long_prompt_prefills(loaded, cases, small_blocks):
    model, processor = loaded
    case = cases["single"]
    (images,), (text,) = images_of(case), case["text"]
    engine = Engine(model, processor, batch_size=4, prefill_budget=0)
    short = engine.submit(images, text, max_tokens=1000, stop_at_eos=False)
    with engine.running():
        for _ in range(50):
            if engine.step():
                break
        long = engine.submit(images, "describe en " + "cat " * 200, max_tokens=2)
        gaps, firsts = 0, None
        for _ in range(200):
            outputs = engine.step()
            gaps += not any(o.uid == short for o in outputs)
            if any(o.uid == long for o in outputs):
                firsts = engine.steps
                break
    assert firsts is not None and firsts > 20  # the long prefill took many steps ...
    assert gaps == 0  # ... and the running row had its token at every one of them


def test_a_cancelled_request_in_a_prefill_is_dropped_at_once(loaded, cases, small_blocks):
    model, processor = loaded
    case = cases["single"]
    engine = Engine(model, processor, batch_size=2, prefill_budget=0)
    (images,), (text,) = images_of(case), case["text"]
    victim = engine.submit(images, text, max_tokens=5)
    with engine.running():
        assert engine.step() == [] and engine.prefilling == 1
        engine.cancel(victim)
        assert not engine.has_work


def test_a_short_prompt_arriving_beside_a_long_prefill_is_not_queued_behind_it(loaded, cases, small_blocks):
    model, processor = loaded
    case = cases["single"]
    (images,), (text,) = images_of(case), case["text"]
    engine = Engine(model, processor, batch_size=4, prefill_budget=0)  # one piece a step: the turns show
    long = engine.submit(images, "describe en " + "cat " * 200, max_tokens=2)
    firsts = {}
    with engine.running():
        for _ in range(3):
            engine.step()
        short = engine.submit(images, text, max_tokens=2)
        for _ in range(1000):
            for o in engine.step():
                firsts.setdefault(o.uid, engine.steps)
            if long in firsts:
                break
    assert short in firsts and firsts[short] < firsts[long]  # the short prompt's pieces took turns with the long's


@pytest.mark.parametrize("budget", ["0.1", True, -1, float("nan"), 61, None])
def test_a_budget_that_is_not_seconds_in_range_is_one_line_naming_it(loaded, budget):
    model, processor = loaded
    with pytest.raises(InputError, match=r"^prefill_budget must be a number of seconds in \[0, 60\]") as e:
        Engine(model, processor, prefill_budget=budget)
    assert e.value.param == "prefill_budget"


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "1e9"])
def test_the_servers_budget_is_checked_before_the_model_loads(text):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.server", "--model", "/nonexistent/model",
                        "--prefill-budget", text], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: argument --prefill-budget: ") and "Traceback" not in r.stderr
