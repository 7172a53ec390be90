"""The engine's promise: every request it accepts ends, with a Result, within its max_tokens steps (and the steps
of its prefill), and leaves nothing behind. Hypothesis draws requests across every accepted range of the settings,
every strategy (greedy, sampled, n, best_of, beams), constrained or not, through an adapter or not (one of them
giving logits that are not finite), several at once in one engine, on both tiny families. A request is refused
with an InputError before any work, or ends with text and a finish reason, or with an error naming its field."""

import math

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES, MODELS
from mlx_paligemma.errors import InputError
from mlx_paligemma.generation.engine import Engine
from mlx_paligemma.generation.settings import check_settings
from mlx_paligemma.models.adapters import MultiLoRALinear, add_adapter

IMAGE = Image.open(FIXTURES / "images" / "chelsea.jpg")
PROMPTS = ["caption en", "detect cat ; dog", "answer en what is it?", "segment cat"]
CONSTRAINTS = [{}, {"choices": ["a cat", "a dog", "nothing"]}, {"regex": "[a-z ]{1,12}"},
               {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
               {"constrain": True}]
PREFILL_STEPS = 40  # bound on the steps a prefill of these prompts takes with a budget of 0 (a piece a step)


@pytest.fixture(scope="module", params=MODELS)
def adapted(request):
    """A model with two adapters: "ok" (small random factors) and "broken", whose logits overflow."""
    model, processor = mp.load(str(FIXTURES / request.param), dtype=mx.float32)
    layers = model.language_model.model.layers
    dim = model.config.text_config.hidden_size
    out = layers[0].self_attn.q_proj.weight.shape[0]
    for name in ("ok", "broken"):
        mx.random.seed(1)
        add_adapter(model, name, {
            "language_model.model.layers.0.self_attn.q_proj.lora_a": mx.random.normal((dim, 4)) * 0.01,
            "language_model.model.layers.0.self_attn.q_proj.lora_b": mx.random.normal((4, out)) * 0.01}, 1.0)
    q_proj = layers[0].self_attn.q_proj
    assert isinstance(q_proj, MultiLoRALinear)
    # Its products overflow (set past admission, which refuses factors and scales that are not finite).
    q_proj.scales = mx.where(mx.arange(q_proj.scales.shape[0]) == q_proj.scales.shape[0] - 1, mx.inf, q_proj.scales)
    return model, processor


def decoding():
    """One request's settings, as a surface would pass them (some combinations are refused, and that is fine)."""
    common = dict(max_tokens=st.integers(1, 10), seed=st.one_of(st.none(), st.integers(0, 2**31)),
                  adapter=st.sampled_from([None, "ok", "broken"]))
    sampled = dict(temperature=st.one_of(st.just(0.0), st.floats(1e-4, 5.0)), top_p=st.floats(0.01, 1.0),
                   top_k=st.integers(0, 50), min_p=st.floats(0.0, 1.0),
                   repetition_penalty=st.one_of(st.none(), st.floats(0.1, 3.0)),
                   logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 1500), st.floats(-100, 100),
                                                                   max_size=3)),
                   stop=st.lists(st.text("ab <>", min_size=1, max_size=3), max_size=2),
                   logprobs=st.one_of(st.none(), st.integers(0, 5)))
    kinds = [
        st.fixed_dictionaries({**common, **sampled}),
        st.fixed_dictionaries({**common, **sampled, "n": st.integers(2, 3)}),
        st.fixed_dictionaries({**common, **sampled, "best_of": st.integers(2, 4),
                               "temperature": st.floats(0.1, 3.0)}),
        st.fixed_dictionaries({**common, "num_beams": st.integers(2, 4), "length_penalty": st.floats(-50, 50),
                               "early_stopping": st.sampled_from([True, False, "never"]),
                               "num_return_sequences": st.integers(1, 2), "logprobs": st.sampled_from([None, 0])}),
    ]
    return st.tuples(st.one_of(kinds), st.sampled_from(CONSTRAINTS), st.sampled_from(PROMPTS))


@hypothesis_settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=st.lists(decoding(), min_size=1, max_size=3), budget=st.sampled_from([0, 60]))
def test_every_accepted_request_ends_with_a_result(adapted, requests, budget):
    model, processor = adapted
    engine = Engine(model, processor, batch_size=4, prefill_budget=budget)
    limits = {}
    for given_settings, constraint, prompt in requests:
        try:
            checked = check_settings("test", **given_settings, **constraint)
            uid = engine.submit(IMAGE, prompt, checked)
        except InputError as e:  # refused before any work: one line naming its field
            assert str(e) and "\n" not in str(e)
            continue
        limits[uid] = checked
    results = {}
    bound = PREFILL_STEPS * max(1, len(limits)) + max([s.max_tokens for s in limits.values()], default=0) + 2
    with engine.running():
        for _ in range(bound):
            if not engine.has_work:
                break
            for out in engine.step():
                if out.result is not None:
                    assert out.uid not in results, "a request ended twice"
                    results[out.uid] = out.result
    assert not engine.has_work and set(results) == set(limits), "a request never ended"
    for uid, result in results.items():
        s = limits[uid]
        if result.finish_reason == "error":
            assert isinstance(result.error, InputError) and str(result.error)
            if s.adapter == "broken":
                assert result.error.param == "adapter" and "broken" in str(result.error)
            continue
        assert s.adapter != "broken", "logits that are not finite gave an answer"
        assert result.finish_reason in ("stop", "length")
        assert 1 <= len(result.tokens) <= s.max_tokens
        assert all(math.isfinite(v) for v in result.logprobs)
        assert result.sequences and len(result.sequences) <= max(s.n, s.num_return_sequences)
