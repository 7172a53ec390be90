"""The server's decoding options through the official openai client, against the Python API on the same weights:
logprobs/top_logprobs (OpenAI's shapes, streamed and not), n choices (seeded seed, seed+1, ...), beam search
(num_beams, length_penalty, early_stopping as extra body fields), --deterministic, structured output
(response_format, regex, choices, constrain), and every bad value a 400 naming its field with nothing left
running."""

import json
import re

import numpy as np
import openai
import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES, hand_objects
from test_server import AUTH, EOS, IMAGES, KEY, MODEL, Server, call, check_error, good, message, with_

CAT = IMAGES / "chelsea.jpg"


@pytest.fixture(scope="module")
def server():
    s = Server(MODEL, "--api-key", KEY, "--batch-size", "8", "--queue-size", "8", "--max-tokens-limit", "4000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded():
    return mp.load(str(MODEL))


def api(loaded, prompt="caption en", image=CAT, **kw):
    model, processor = loaded
    result = mp.generate(model, processor, [str(image)], prompt, **kw)
    if "logprobs" in kw:  # the whole result: tokens, log-probabilities, sequences
        return result
    return result.texts if kw.get("num_return_sequences", 1) > 1 else result.text


def create(client, prompt="caption en", image=CAT, **kw):
    return client.chat.completions.create(model=str(MODEL), messages=message(prompt, str(image)), **kw)


def streamed(client, n=1, **kw):
    """Per choice: (text, logprobs.content entries, finish_reason), from the chunks."""
    out = [["", [], None] for _ in range(n)]
    for chunk in create(client, stream=True, n=n, **kw):
        for c in chunk.choices:
            out[c.index][0] += c.delta.content or ""
            out[c.index][1] += c.logprobs.content if c.logprobs else []
            out[c.index][2] = c.finish_reason or out[c.index][2]
    return out


def plain(entries):
    return [(e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs]) for e in entries]


@pytest.mark.parametrize("prompt, image", [("caption en", CAT), ("detect cat", CAT),
                                           ("answer en what is this?", IMAGES / "coffee.jpg")])
def test_logprobs_equal_the_api(server, client, loaded, prompt, image):
    want = api(loaded, prompt, image, max_tokens=12, logprobs=3)
    r = create(client, prompt, image, max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want.text
    # Within float32 rounding, not bitwise: the server is another process, and this one's earlier MLX work (the
    # mask decoder's convolutions in test_detection, run first) changes the last bits of the same computation here.
    np.testing.assert_allclose([e.logprob for e in content], want.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose([[t.logprob for t in e.top_logprobs] for e in content],
                               [[v for _, v in top] for top in want.top_logprobs], rtol=0, atol=1e-5)
    # Each entry's bytes are its token's: the answer's bytes are theirs joined; <eos> has none.
    model, processor = loaded
    assert [e.bytes is None for e in content] == [t in processor.tokenizer.specials.values() for t in want.tokens]
    text = b"".join(bytes(e.bytes or []) for e in content).decode("utf-8", "replace")
    assert text.strip() == want.text.strip()
    for e, top in zip(content, want.top_logprobs):
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6 or e.token in [t.token for t in e.top_logprobs]
        assert len(e.top_logprobs) == 3 and [t.logprob for t in e.top_logprobs] == sorted(
            [t.logprob for t in e.top_logprobs], reverse=True)
    # Streamed: the same entries, in the chunks of their pieces.
    (text, entries, finish), = streamed(client, prompt=prompt, image=image, max_tokens=12, logprobs=True,
                                        top_logprobs=3)
    assert text == want.text and finish == r.choices[0].finish_reason
    assert plain(entries) == plain(content)


def test_logprobs_off_and_without_alternatives(server, client, loaded):
    r = create(client, max_tokens=6)
    assert r.choices[0].logprobs is None
    r = create(client, max_tokens=6, logprobs=True)
    np.testing.assert_allclose([e.logprob for e in r.choices[0].logprobs.content],
                               api(loaded, max_tokens=6, logprobs=0).logprobs, rtol=0, atol=1e-5)  # see above
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


@pytest.mark.parametrize("body, want", [({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0),
                                        ({"logprobs": True, "top_logprobs": 3}, 3)])
def test_the_engine_is_asked_for_logprobs_only_when_the_client_is(body, want):
    """A plain request's greedy rows compute no log-probabilities (a softmax over the vocabulary per step); the
    engine itself asks them for detect/segment rows, whose objects are scored."""
    from mlx_paligemma.server.chat import Limits, settings

    assert settings({"messages": [], **body}, Limits(), logprobs=bool(body.get("logprobs")))["logprobs"] == want


def test_beam_choices_carry_their_tokens_logprobs(server, client, loaded):
    """A beam search's choices: each sequence's tokens with the log-probabilities the API gives them."""
    r = create(client, max_tokens=10, n=2, logprobs=True, extra_body={"num_beams": 3})
    want = api(loaded, max_tokens=10, num_beams=3, num_return_sequences=2, logprobs=0)
    for c, sequence in zip(r.choices, want.sequences):
        content = c.logprobs.content
        assert c.message.content == sequence.text
        np.testing.assert_allclose([e.logprob for e in content], sequence.logprobs, rtol=0, atol=1e-5)
        assert all(e.top_logprobs == [] for e in content)


def test_best_of_choices_are_the_likeliest_samples(server, client, loaded):
    """best_of (extra field): its n choices are the API's best_of sequences, likeliest first, with their values."""
    kw = dict(max_tokens=10, temperature=1.0, seed=5)
    want = api(loaded, best_of=4, num_return_sequences=2, logprobs=0, **kw)
    r = create(client, n=2, logprobs=True, extra_body={"best_of": 4}, **kw)
    assert [c.message.content for c in r.choices] == [s.text for s in want.sequences]
    for c, sequence in zip(r.choices, want.sequences):
        assert c.finish_reason == sequence.finish_reason
        np.testing.assert_allclose([e.logprob for e in c.logprobs.content], sequence.logprobs, rtol=0, atol=1e-5)


def test_min_score_leaves_out_the_less_likely_objects(server, client, loaded):
    size = Image.open(CAT).size
    kw = dict(max_tokens=40, temperature=1.0, seed=2)
    want = hand_objects(loaded[1], api(loaded, "detect cat ; dog", constrain=True, logprobs=0, **kw), size)
    assert len({o["score"] for o in want}) > 1, "the test needs objects of different scores"
    scores = sorted({o["score"] for o in want})
    middle = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # between two of them
    r = create(client, "detect cat ; dog", extra_body={"constrain": True, "min_score": middle}, **kw)
    assert r.model_extra["objects"] == [o for o in want if o["score"] >= middle]


def test_n_seeded_choices_equal_api_calls_with_seed_plus_i(server, client, loaded):
    sampled = dict(max_tokens=16, temperature=1.0, seed=11)
    want = [api(loaded, max_tokens=16, temperature=1.0, seed=11 + i) for i in range(3)]
    assert len(set(want)) > 1, "the seeds must give different answers for the test to mean something"
    r = create(client, n=3, **sampled)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == want
    assert r.usage.completion_tokens == sum(len(processor_tokens) for processor_tokens in [
        api(loaded, max_tokens=16, temperature=1.0, seed=11 + i, logprobs=0).tokens for i in range(3)])
    assert [t for t, _, _ in streamed(client, n=3, **sampled)] == want
    # Greedy n: the same answer n times.
    r = create(client, n=2, max_tokens=8)
    assert [c.message.content for c in r.choices] == [api(loaded, max_tokens=8)] * 2


def test_n_with_logprobs_streamed_equal_not(server, client):
    kw = dict(max_tokens=10, temperature=0.8, seed=3, logprobs=True, top_logprobs=2)
    r = create(client, n=2, **kw)
    got = streamed(client, n=2, **kw)
    for c, (text, entries, finish) in zip(r.choices, got):
        assert (text, finish) == (c.message.content, c.finish_reason)
        assert [e.token for e in entries] == [e.token for e in c.logprobs.content]
        assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in c.logprobs.content], abs=1e-5)


@pytest.mark.parametrize("beams, n, length_penalty, early_stopping", [(3, 1, 1.0, False), (3, 2, 0.5, True),
                                                                      (2, 2, 2.0, "never")])
def test_beams_equal_the_api(server, client, loaded, beams, n, length_penalty, early_stopping):
    settings = dict(num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping)
    want = api(loaded, max_tokens=10, num_return_sequences=n, **settings)
    want = [want] if n == 1 else want
    r = create(client, max_tokens=10, n=n, extra_body=settings)
    assert [c.message.content for c in r.choices] == want
    assert [t for t, _, _ in streamed(client, n=n, max_tokens=10, extra_body=settings)] == want


def test_a_disconnect_cancels_every_choice(server, client):
    before = server.health()["cancelled"]
    stream = create(client, n=3, stream=True, max_tokens=4000, temperature=1.0, logit_bias={str(EOS): -100})
    chunks = iter(stream)
    for _ in range(6):
        next(chunks)
    assert server.health()["active"] == 3
    stream.close()
    health = server.wait_idle(timeout=120)
    assert health["cancelled"] == before + 1


def test_n_counts_against_the_queue(server, client):
    # 16 rows: 8 running and 8 waiting fill the server; one more row is refused.
    streams = [create(client, n=8, stream=True, max_tokens=4000, logit_bias={str(EOS): -100}) for _ in range(2)]
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            create(client, max_tokens=4)
        assert refused.value.status_code == 503 and "busy" in refused.value.message
    finally:
        for s in streams:
            s.close()
    server.wait_idle()
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


BAD = [
    ("logprobs a string", with_(logprobs="yes"), "logprobs", "logprobs must be true or false"),
    ("top_logprobs 21", with_(logprobs=True, top_logprobs=21), "top_logprobs", "[0, 20]"),
    ("top_logprobs a float", with_(logprobs=True, top_logprobs=1.5), "top_logprobs", "[0, 20]"),
    ("top_logprobs without logprobs", with_(top_logprobs=2), "top_logprobs", "needs logprobs"),
    ("n 0", with_(n=0), "n", "[1, 8]"),
    ("n 9", with_(n=9), "n", "[1, 8]"),
    ("n a string", with_(n="2"), "n", "[1, 8]"),
    ("seed + n past 2**64", with_(n=2, seed=2**64 - 1, temperature=1), "seed", "below 2**64"),
    ("num_beams 9", with_(num_beams=9), "num_beams", "limit of 8"),
    ("num_beams 0", with_(num_beams=0), "num_beams", "num_beams must be an integer >= 1"),
    ("num_beams a string", with_(num_beams="3"), "num_beams", "num_beams must be an integer"),
    ("beams with top_logprobs", with_(num_beams=2, logprobs=True, top_logprobs=2), "top_logprobs",
     "no alternatives"),
    ("min_score above 1", with_(min_score=1.5), "min_score", "[0, 1]"),
    ("min_score a string", with_(min_score="0.5"), "min_score", "[0, 1]"),
    ("n above num_beams", with_(num_beams=2, n=3), "n", "at most num_beams"),
    ("best_of 9", with_(best_of=9, temperature=1), "best_of", "limit of 8"),
    ("best_of greedy", with_(best_of=2), "best_of", "give a temperature > 0"),
    ("n above best_of", with_(best_of=2, n=3, temperature=1), "n", "at most best_of"),
    ("best_of with beams", with_(best_of=2, num_beams=2), "num_beams", "not both"),
    ("beams sampled", with_(num_beams=2, temperature=0.5), "num_beams", "leave temperature at 0"),
    ("length_penalty a string", with_(num_beams=2, length_penalty="x"), "length_penalty", "finite number"),
    ("early_stopping sometimes", with_(num_beams=2, early_stopping="sometimes"), "early_stopping", "'never'"),
    ("response_format a string", with_(response_format="json"), "response_format", "response_format must be"),
    ("response_format unknown type", with_(response_format={"type": "xml"}), "response_format",
     "response_format must be"),
    ("json_schema without schema", with_(response_format={"type": "json_schema", "json_schema": {}}),
     "response_format", "needs"),
    ("regex a number", with_(regex=5), "regex", "regex must be a string"),
    ("choices empty", with_(choices=[]), "choices", "non-empty list"),
    ("choices of numbers", with_(choices=[1, 2]), "choices", "non-empty list"),
    ("constrain a string", with_(constrain="yes"), "constrain", "constrain must be true or false"),
    ("two constraints", with_(regex="a+", choices=["a"]), "choices", "give one constraint"),
]


@pytest.mark.parametrize("name, body, param, words", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_a_400_naming_the_field_and_leave_nothing_running(server, name, body, param, words):
    # Idle first: an earlier test's request may still be ending (its answer is sent before the worker counts it).
    before = server.wait_idle()
    status, reply = call(server.url + "/v1/chat/completions", body, AUTH)
    check_error(status, reply, 400, words)
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    after = server.health()
    assert (after["active"], after["waiting"], after["finished"]) == (0, 0, before["finished"])
    assert call(server.url + "/v1/chat/completions", good(), AUTH)[0] == 200


def test_deterministic_rows_equal_the_api_alone(loaded):
    s = Server(MODEL, "--api-key", KEY, "--deterministic", "--batch-size", "4")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        kw = dict(max_tokens=12, temperature=1.0, seed=21, logprobs=True, top_logprobs=2)
        r = create(client, n=3, **kw)
        for i, c in enumerate(r.choices):
            want = api(loaded, max_tokens=12, temperature=1.0, seed=21 + i, logprobs=2)
            assert c.message.content == want.text
            # Tokens exactly; values to float32 rounding across processes (see test_logprobs_equal_the_api). That
            # rows are bitwise alone within one process whatever shares the steps: tests/test_batch_invariant.py.
            np.testing.assert_allclose([e.logprob for e in c.logprobs.content], want.logprobs, rtol=0, atol=1e-5)
            np.testing.assert_allclose([[t.logprob for t in e.top_logprobs] for e in c.logprobs.content],
                                       [[v for _, v in top] for top in want.top_logprobs], rtol=0, atol=1e-5)
    finally:
        s.stop()


SCHEMA = {"type": "object", "properties": {"cat": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9,
                                                                            "minimum": 0}},
          "required": ["cat", "n"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_response_format_answers_parse(server, client, loaded, stream):
    # The tiny random model otherwise writes noise: every answer parsing is the constraint's doing.
    formats = [{"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}, {"type": "json_object"}]
    for response_format in formats:
        for seed in range(3):
            kw = dict(max_tokens=120, temperature=1.0, seed=seed, response_format=response_format)
            if stream:
                (text, _, finish), = streamed(client, **kw)
            else:
                r = create(client, **kw)
                text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert finish == "stop", text
            answer = json.loads(text)
            assert isinstance(answer, dict)
            if response_format["type"] == "json_schema":
                assert set(answer) == {"cat", "n"} and isinstance(answer["cat"], bool) and 0 <= answer["n"] <= 9
            assert text == api(loaded, max_tokens=120, temperature=1.0, seed=seed, response_format=response_format)
    assert create(client, max_tokens=8, response_format={"type": "text"}).choices[0].message.content == api(
        loaded, max_tokens=8)


def test_regex_choices_and_the_detect_grammar(server, client, loaded):
    r = create(client, max_tokens=10, n=3, temperature=1.0, seed=4, extra_body={"regex": "[0-9]{3}"})
    assert all(re.fullmatch("[0-9]{3}", c.message.content) for c in r.choices)
    r = create(client, "answer en is there a cat?", max_tokens=5, n=3, temperature=1.0, seed=1,
               extra_body={"choices": ["yes", "no"]})
    assert all(c.message.content in ("yes", "no") for c in r.choices)
    # constrain: detect answers are well-formed boxes of the prompt's classes; the objects read all of them.
    size = Image.open(CAT).size
    r = create(client, "detect cat ; dog", max_tokens=40, temperature=1.0, seed=2, extra_body={"constrain": True})
    text = r.choices[0].message.content
    alone = api(loaded, "detect cat ; dog", max_tokens=40, temperature=1.0, seed=2, constrain=True, logprobs=0)
    assert text == alone.text
    objects = r.model_extra["objects"]
    assert objects == hand_objects(loaded[1], alone, size)
    assert objects and all(o["label"] in ("cat", "dog") for o in objects)
    pieces = [p for p in text.split(" ; ") if p]
    complete = pieces if r.choices[0].finish_reason == "stop" else pieces[:-1]
    assert len(objects) >= len(complete)
    # An answer that already conforms is unchanged by its constraint.
    free = api(loaded, max_tokens=12)
    assert create(client, max_tokens=12, extra_body={"regex": re.escape(free) + ".*"}).choices[0].message.content \
        == free


CONSTRAINT_ERRORS = [
    ("a bad schema", with_(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}),
     "response_format", "json schema"),
    ("a regex that does not compile", with_(regex="("), "regex", "regex"),
    ("a regex that matches nothing", with_(regex="[^\\s\\S]"), "regex", "matches no answer"),
    ("constrain on a detect prompt without classes", {**with_(constrain=True), "messages": message(
        "detect ", str(CAT))}, "constrain", "needs classes"),
]


@pytest.mark.parametrize("name, body, param, words", CONSTRAINT_ERRORS, ids=[c[0] for c in CONSTRAINT_ERRORS])
def test_bad_constraints_are_a_400_before_decoding(server, name, body, param, words):
    test_bad_values_are_a_400_naming_the_field_and_leave_nothing_running(server, name, body, param, words)


def test_each_choice_carries_its_objects(server, client, loaded):
    size = Image.open(CAT).size
    kw = dict(max_tokens=24, temperature=1.0, seed=8)
    r = create(client, "detect cat ; dog", n=2, extra_body={"constrain": True}, **kw)
    assert "objects" not in r.model_extra  # at the top only with one choice, where it always was
    for i, c in enumerate(r.choices):
        want = api(loaded, "detect cat ; dog", constrain=True, logprobs=0, **{**kw, "seed": 8 + i})
        assert c.message.content == want.text
        assert c.model_extra["objects"] == hand_objects(loaded[1], want, size)
    assert any(c.model_extra["objects"] for c in r.choices), "the test needs a box in an answer"


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model"])
def test_token_bytes_join_to_the_decoded_text(tmp_path, kind):
    """logprobs' bytes, for both tokenizer backends: those of any ids joined are the text the tokenizer decodes
    (byte-fallback pieces aside, which spell characters only together: decoders differ on a broken sequence; and
    <unk>, which sentencepiece decodes as " \u2047 ")."""
    import random
    import shutil

    from mlx_paligemma.processing.processor import Tokenizer
    from mlx_paligemma.processing.tokens import piece

    shutil.copy(FIXTURES / "paligemma-tiny" / kind, tmp_path / kind)
    tokenizer = Tokenizer(tmp_path)
    ordinary = [i for i in range(tokenizer.vocab_size) if i == tokenizer.image_id
                or not re.fullmatch(r"<0x[0-9A-F]{2}>|<unk>", tokenizer.id_to_piece(i))]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(ordinary) for _ in range(8)]
        entries = [piece(tokenizer, i) for i in ids]
        assert b"".join(bytes(e["bytes"] or []) for e in entries).decode() == tokenizer.decode(ids)
        assert "".join(e["token"] for e in entries if e["bytes"] is not None) == tokenizer.decode(ids)
    assert piece(tokenizer, tokenizer.eos_id) == {"token": "<eos>", "bytes": None}
    assert piece(tokenizer, tokenizer.vocab_size + 5) == {"token": "", "bytes": None}
    byte = tokenizer.piece_to_id("<0xE2>")
    assert piece(tokenizer, byte) == {"token": "bytes:\\xe2", "bytes": [0xE2]}
