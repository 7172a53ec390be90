"""A request's own fault ends that request alone: whatever its constraint, sampler or logits processor raises while
it is decoded, the rows beside it in the same batch go on and make exactly the tokens they make alone; the request
gets one line naming its field (the API an InputError, the server a 400, the batch command an error line,
generate exit 1)."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.generation.engine import Engine
from mlx_paligemma.generation.request import Request
from mlx_paligemma.generation.settings import check_settings
from conftest import FIXTURES

MODEL = FIXTURES / "paligemma2-tiny"
CAT, COFFEE = str(FIXTURES / "images" / "chelsea.jpg"), str(FIXTURES / "images" / "coffee.jpg")
# llguidance refuses it only at the first token (an alternative of more than 2,000 items, met when the answer's "{"
# is consumed): the checks before queuing find it (limits: the parser's fuel, a trial first step), so it is refused
# in one line naming its field; faults met later while decoding are injected below (mask, advance, sampler).
POISON = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                    for i in range(2100)]}
INNOCENT = [(CAT, "caption en", {}), (COFFEE, "ocr", {}), (CAT, "detect cat", {"num_beams": 2}),
            (COFFEE, "caption en", {"temperature": 1.0, "seed": 5})]


@pytest.fixture(scope="module")
def loaded():
    return mp.load(str(MODEL))


class Failing:
    """A constraint whose mask (or advance) raises at the `at`-th step, after a clean start."""

    field = "regex"

    def __init__(self, where: str, at: int = 1):
        self.where, self.at, self.steps = where, at, 0

    def copy(self):
        return self

    def allowed_np(self):
        import numpy as np

        self.steps += 1
        if self.where == "mask" and self.steps > self.at:
            raise RuntimeError("mask blew up\nwith a second line")
        return np.ones(self.vocab, bool)

    def advance(self, token):
        if self.where == "advance" and self.steps > self.at:
            raise RuntimeError("advance blew up")


def tokens_of(engine, uids):
    """Each request's Result, by uid, running the engine to the end."""
    results = {}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                if out.result is not None:
                    results[out.uid] = out.result
    return [results[u] for u in uids]


def alone(loaded, image, prompt, settings):
    engine = Engine(*loaded, batch_size=4)
    return tokens_of(engine, [engine.submit(image, prompt, max_tokens=12, **settings)])[0]


def innocent_tokens(result):
    return [s.tokens for s in result.sequences]


@pytest.mark.parametrize("poison", ["mask", "advance", "sampler"])
def test_a_failing_row_ends_alone_and_the_others_are_untouched(loaded, poison):
    model, processor = loaded
    want = [innocent_tokens(alone(loaded, *job)) for job in INNOCENT]
    engine = Engine(model, processor, batch_size=8)
    uids = [engine.submit(image, prompt, max_tokens=12, **settings) for image, prompt, settings in INNOCENT[:2]]
    with pytest.raises(mp.InputError) as refused:  # refused before it is queued: no row of it runs
        engine.submit(CAT, "caption en", max_tokens=12, json_schema=POISON)
    assert refused.value.param == "json_schema" and "\n" not in str(refused.value)
    if poison == "sampler":
        def sampler(logprobs):
            raise RuntimeError("sampler blew up")
        ids = processor(images=[[CAT]], text="caption en")["input_ids"][0].tolist()
        bad = engine.add(Request(ids, pixel_values=np.array(processor(images=[[CAT]], text="x")["pixel_values"]),
                                 settings=check_settings(max_tokens=12, temperature=1.0), sampler=sampler))
        field, words = "sampler", "sampler blew up"
    else:
        failing = Failing(poison)
        failing.vocab = model.config.text_config.vocab_size
        ids = processor(images=[[CAT]], text="caption en")["input_ids"][0].tolist()
        bad = engine.add(Request(ids, pixel_values=np.array(processor(images=[[CAT]], text="x")["pixel_values"]),
                                 settings=check_settings(max_tokens=12), constraint=failing))
        field, words = "regex", f"{poison} blew up"
    uids += [engine.submit(image, prompt, max_tokens=12, **settings) for image, prompt, settings in INNOCENT[2:]]
    results = tokens_of(engine, uids + [bad])
    assert [innocent_tokens(r) for r in results[:-1]] == want
    assert all(r.error is None and r.finish_reason in ("stop", "length") for r in results[:-1])
    failed = results[-1]
    assert failed.finish_reason == "error" and isinstance(failed.error, mp.InputError)
    assert failed.error.param == field and words in str(failed.error) and "\n" not in str(failed.error)


def test_the_api_raises_the_rows_own_error(loaded):
    with pytest.raises(mp.InputError) as e:
        mp.generate(*loaded, CAT, "caption en", max_tokens=8, json_schema=POISON)
    assert e.value.param == "json_schema" and "\n" not in str(e.value)


def test_the_batch_command_writes_an_error_line_and_goes_on(loaded, tmp_path):
    from mlx_paligemma.batch import main as batch_main

    lines = [{"image": CAT, "prompt": "caption en"}, {"image": CAT, "prompt": "caption en", "json_schema": POISON},
             {"image": COFFEE, "prompt": "ocr"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert batch_main(["--model", str(MODEL), "--input", str(tmp_path / "in.jsonl"), "--output",
                       str(tmp_path / "out.jsonl"), "--max-tokens", "8"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("text" in o, "error" in o) for o in out] == [(True, False), (False, True), (True, False)]
    assert out[1]["error"].startswith("bad json schema: ") and "\n" not in out[1]["error"]
    assert out[0]["text"] == mp.generate(*loaded, CAT, "caption en", max_tokens=8).text
    assert out[2]["text"] == mp.generate(*loaded, COFFEE, "ocr", max_tokens=8).text


def test_generate_exits_1_with_one_line(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(POISON))
    r = subprocess.run([sys.executable, "-m", "mlx_paligemma.generate", "--model", str(MODEL), "--image", CAT,
                        "--prompt", "caption en", "--max-tokens", "8", "--json-schema", str(schema)],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: bad json schema: ")


def test_the_server_answers_the_poisoned_request_a_400_and_the_others_theirs(loaded):
    """Three clients decoding (their <eos> forbidden, so they run long) when the poisoned request joins their batch:
    it gets a 400 naming its field, and they get what the API answers alone."""
    import time

    from test_server import AUTH, EOS, KEY, Server, call, message

    server = Server(MODEL, "--api-key", KEY, "--batch-size", "8", "--max-tokens-limit", "4000")
    tokens, no_eos = 300, {str(EOS): -100}
    try:
        def body(prompt, image, **more):
            return {"model": str(MODEL), "max_tokens": tokens, "messages": message(prompt, image),
                    "logit_bias": no_eos, **more}

        bodies = [body("caption en", CAT), body("ocr", COFFEE), body("caption en", COFFEE, n=2),
                  body("caption en", CAT, response_format={"type": "json_schema",
                                                           "json_schema": {"name": "x", "schema": POISON}})]
        replies = [None] * 4

        def send(i):
            replies[i] = call(server.url + "/v1/chat/completions", bodies[i], AUTH, timeout=300)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads[:3]:
            t.start()
        for _ in range(600):  # every loop bounded: 60 s at most
            if server.health()["active"] >= 4:  # 1 + 1 + 2 rows
                break
            time.sleep(0.1)
        threads[3].start()
        for t in threads:
            t.join(300)
        status, reply = replies[3]
        assert status == 400 and reply["error"]["param"] == "response_format", reply
        assert reply["error"]["message"].startswith("bad json schema: ") and "\n" not in reply["error"]["message"]
        assert [r[0] for r in replies[:3]] == [200, 200, 200]
        texts = [[c["message"]["content"] for c in r[1]["choices"]] for r in replies[:3]]
        settings = dict(max_tokens=tokens, logit_bias={EOS: -100})
        assert texts[0] == [mp.generate(*loaded, CAT, "caption en", **settings).text]
        assert texts[1] == [mp.generate(*loaded, COFFEE, "ocr", **settings).text]
        assert texts[2] == [mp.generate(*loaded, COFFEE, "caption en", **settings).text] * 2
        assert server.health()["active"] == 0
    finally:
        server.stop()


def test_an_engine_fault_fails_the_running_requests_without_quoting_them(loaded, monkeypatch):
    """The model thread's catch-all is for faults of the engine itself: its message names none of the requests'
    input (another client's prompt or grammar), and the worker goes on with a fresh engine."""
    import asyncio

    from PIL import Image

    from mlx_paligemma.server.worker import Job, Worker

    model, processor = loaded
    worker = Worker(model, processor, batch_size=4)
    real = Engine.step
    calls = []

    def step(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("SECRET prompt text inside an engine fault")
        return real(self)

    monkeypatch.setattr(Engine, "step", step)

    async def ask(prompt):
        handle = worker.submit(Job([Image.open(CAT)], prompt, {"max_tokens": 6}), asyncio.get_running_loop())
        events = []
        for _ in range(100):  # bounded: accepted, pieces, the last or an error
            events.append(await asyncio.wait_for(handle.events.get(), 60))
            if events[-1].kind == "error" or events[-1].finish_reason:
                return events
        raise AssertionError("no end")

    async def main():
        worker.start()
        try:
            failed = await ask("caption en SECRET")
            ok = await ask("caption en")
        finally:
            worker.shutdown()
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].kind == "error" and failed[-1].status == 500
    assert "SECRET" not in failed[-1].message and "\n" not in failed[-1].message
    assert ok[-1].finish_reason and "".join(e.text for e in ok) == mp.generate(*loaded, CAT, "caption en",
                                                                             max_tokens=6).text


@pytest.mark.parametrize("schema", [{"type": "number", "minimum": 10**400}, '{"type": "number", "minimum": 1e400}'])
def test_a_schema_llguidance_cannot_take_is_the_requests_fault(loaded, schema):
    """A number past float range in a schema was a 500 (an unexpected ValueError): it is one InputError line
    naming json_schema, before any decoding."""
    with pytest.raises(mp.InputError) as e:
        mp.generate(*loaded, CAT, "caption en", max_tokens=4, json_schema=schema)
    assert e.value.param == "json_schema"
    assert str(e.value).startswith(("bad json schema: ", "the json schema cannot be read: "))
    assert "\n" not in str(e.value)

