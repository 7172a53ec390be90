"""A request of several rows (n, best_of, num_beams) is weighed before it is queued: rows x (prompt tokens +
max_tokens, within the context) over limits.py's max_request_tokens is refused with one line naming the field, on
every surface (the engine, generate, the server's --max-request-tokens), and nothing of it runs."""

import dataclasses
import json

import pytest

from conftest import FIXTURES, images_of
from mlx_paligemma import limits
from mlx_paligemma.errors import InputError
from mlx_paligemma.generation.engine import Engine
from test_server import IMAGES, MODEL, Server, call, data_url

CASE = "single"


@pytest.fixture
def limit(monkeypatch):
    def set_to(tokens: int) -> None:
        monkeypatch.setattr(limits, "LIMITS", dataclasses.replace(limits.LIMITS, max_request_tokens=tokens))
    return set_to


def prompt_of(cases, processor):
    (images,), (text,) = images_of(cases[CASE]), cases[CASE]["text"]
    return images, text, len(processor(images=[images], text=text)["input_ids"][0])


@pytest.mark.parametrize("name, extra", [("n", {"temperature": 1.0}), ("best_of", {"temperature": 1.0}),
                                         ("num_beams", {})])
def test_rows_times_tokens_over_the_limit_are_refused_before_the_queue(loaded, cases, limit, name, extra):
    model, processor = loaded
    images, text, prompt = prompt_of(cases, processor)
    engine = Engine(model, processor)
    limit(4 * (prompt + 10))  # exactly 4 rows of the prompt and 10 new tokens
    engine.submit(images, text, max_tokens=10, **{name: 4}, **extra)  # at the limit: queued
    assert len(engine.waiting) == 4
    with pytest.raises(InputError) as e:
        engine.submit(images, text, max_tokens=11, **{name: 4}, **extra)
    assert e.value.param == name
    assert str(e.value) == (f"{name}=4 rows of {prompt + 11} tokens (a prompt of {prompt}, up to 11 new) make "
                            f"{4 * (prompt + 11)} tokens, more than the limit of {4 * (prompt + 10)}: ask for fewer "
                            "rows, fewer max_tokens or a shorter prompt")
    assert len(engine.waiting) == 4  # nothing of the refused request was queued


def test_one_row_and_scoring_rows_are_not_weighed(loaded, cases, limit):
    """One row is bounded by the context; scoring's forced rows come in the caller's own batches."""
    model, processor = loaded
    images, text, prompt = prompt_of(cases, processor)
    engine = Engine(model, processor)
    limit(prompt)
    engine.submit(images, text, max_tokens=50)
    engine.submit(images, text, forced=[[5, 6, 7]] * 4, max_tokens=3, stop_at_eos=False)
    assert len(engine.waiting) == 5


def test_new_tokens_count_within_the_context(loaded, cases, limit):
    model, processor = loaded
    images, text, prompt = prompt_of(cases, processor)
    context = model.config.text_config.max_position_embeddings
    limit(2 * context)
    engine = Engine(model, processor)
    engine.submit(images, text, max_tokens=10 * context, n=2, temperature=1.0)  # each row ends at the context
    assert len(engine.waiting) == 2


def test_the_server_refuses_with_a_400_naming_the_field():
    s = Server(MODEL, "--max-request-tokens", "100", "--max-tokens-limit", "4000")
    try:
        message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
            IMAGES / "chelsea.jpg")}}, {"type": "text", "text": "caption en"}]}]
        for name, temperature in (("n", 1.0), ("best_of", 1.0), ("num_beams", 0.0)):
            status, body = call(s.url + "/v1/chat/completions", {"messages": message, "max_tokens": 40, name: 3,
                                                                  "temperature": temperature},
                                {"Content-Type": "application/json"}, timeout=120)
            assert status == 400 and body["error"]["param"] == name, body
            assert "more than the limit of 100" in body["error"]["message"]
        status, body = call(s.url + "/v1/chat/completions", {"messages": message, "max_tokens": 4, "n": 2},
                            {"Content-Type": "application/json"}, timeout=120)
        assert status == 200 and len(body["choices"]) == 2
        health = s.wait_idle()
        assert (health["finished"], health["cancelled"]) == (1, 0)
    finally:
        s.stop()
