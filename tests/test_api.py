"""The Python API's results in mlx-vlm's shapes: generate -> GenerationResult (.text, tokens, logprobs, finish
reason, counts, objects), stream_generate -> GenerationResult pieces, batch_generate -> BatchResponse (.texts,
results, stats); and the previous release's forms that keep working for one release."""

import pytest
from PIL import Image

import mlx_paligemma as mp
from conftest import FIXTURES, hand_objects

MODEL = FIXTURES / "paligemma2-tiny"
CAT, COFFEE = str(FIXTURES / "images" / "chelsea.jpg"), str(FIXTURES / "images" / "coffee.jpg")


@pytest.fixture(scope="module")
def loaded():
    return mp.load(str(MODEL))


def test_generate_returns_a_result_with_text_and_counts(loaded):
    model, processor = loaded
    r = mp.generate(model, processor, CAT, "caption en", max_tokens=6)
    assert isinstance(r, mp.GenerationResult) and str(r) == r.text and isinstance(r.text, str)
    # Log-probabilities when asked (logprobs=0: each token's own), none otherwise (a greedy row skips them).
    assert r.text == processor.decode(r.tokens) and len(r.tokens) == r.generation_tokens and r.logprobs == []
    asked = mp.generate(model, processor, CAT, "caption en", max_tokens=6, logprobs=0)
    assert asked.tokens == r.tokens and len(asked.logprobs) == len(r.tokens) and all(v <= 0 for v in asked.logprobs)
    # The prompt: one image of 16 tokens (the tiny checkpoint's image_seq_length), <bos>, "caption en\n" in 3 tokens.
    assert r.prompt_tokens == 16 + 1 + 3 and r.total_tokens == r.prompt_tokens + r.generation_tokens
    eos = processor.tokenizer.eos_id
    assert r.finish_reason == ("stop" if r.tokens[-1] == eos else "length")
    assert r.sequences is None and r.objects is None and r.peak_memory > 0


def test_stream_pieces_add_up_to_the_result(loaded):
    model, processor = loaded
    whole = mp.generate(model, processor, CAT, "caption en", max_tokens=8, logprobs=2)
    pieces = list(mp.stream_generate(model, processor, CAT, "caption en", max_tokens=8, logprobs=2))
    assert all(isinstance(p, mp.GenerationResult) and len(p.tokens) == 1 for p in pieces)
    assert "".join(p.text for p in pieces) == whole.text
    assert [p.token for p in pieces] == whole.tokens and [p.top_logprobs[0] for p in pieces] == whole.top_logprobs
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + [whole.finish_reason]


def test_batch_generate_returns_a_response(loaded):
    model, processor = loaded
    response = mp.batch_generate(model, processor, [CAT, COFFEE], ["caption en", "ocr"], max_tokens=6)
    alone = [mp.generate(model, processor, i, p, max_tokens=6) for i, p in ((CAT, "caption en"), (COFFEE, "ocr"))]
    assert isinstance(response, mp.BatchResponse)
    assert response.texts == [a.text for a in alone] == [r.text for r in response.results]
    assert [r.tokens for r in response] == [a.tokens for a in alone] and len(response) == 2  # iterates its results
    assert response.stats.prompts == 2
    assert response.stats.generation_tokens == sum(len(a.tokens) for a in alone)
    assert response.stats.prompt_tokens == sum(a.prompt_tokens for a in alone)


def test_objects_of_a_detect_prompt_are_in_the_result(loaded):
    model, processor = loaded
    r = mp.generate(model, processor, CAT, "detect cat ; dog", max_tokens=40, temperature=1.0, seed=2,
                    constrain=True)
    from mlx_paligemma.tasks.detection import objects_to_json

    want = hand_objects(processor, r, Image.open(CAT).size)
    assert len(want) > 1 and objects_to_json(r.objects) == want
    batch = mp.batch_generate(model, processor, [CAT], ["detect cat ; dog"], max_tokens=40, temperature=1.0,
                              seed=2, constrain=True)
    assert objects_to_json(batch.results[0].objects) == want


def test_several_answers_are_sequences(loaded):
    model, processor = loaded
    beams = mp.generate(model, processor, CAT, "caption en", max_tokens=6, num_beams=3, num_return_sequences=2)
    assert len(beams.sequences) == 2 and beams.texts == [s.text for s in beams.sequences]
    assert beams.text == beams.texts[0] and beams.tokens == beams.sequences[0].tokens
    n = mp.generate(model, processor, CAT, "caption en", max_tokens=6, temperature=1.0, seed=4, n=3)
    assert n.texts == [mp.generate(model, processor, CAT, "caption en", max_tokens=6, temperature=1.0,
                                   seed=4 + i).text for i in range(3)]


def test_generate_step_is_generate_tokens_with_a_warning(loaded):
    model, processor = loaded
    inputs = processor(images=[[CAT]], text=["caption en"])
    want = [t.tolist() for t in mp.generate_tokens(model, inputs["input_ids"], inputs["pixel_values"], max_tokens=3)]
    with pytest.warns(DeprecationWarning, match="generate_tokens"):
        got = [t.tolist() for t in mp.generate_step(model, inputs["input_ids"], inputs["pixel_values"],
                                                    max_tokens=3)]
    assert got == want and len(want) == 3


@pytest.mark.parametrize("settings, param, message", [
    (dict(logprobs="3"), "logprobs", "logprobs must be an integer >= 0, got '3'"),
    (dict(choices=["a"] * 10_001), "choices", "choices has 10001 strings, more than the limit of 10000"),
    (dict(adapter=[1, 2]), "adapter", "adapter must be a name, None, or a list of one per prompt (2)"),
])
def test_a_bad_setting_is_one_line_naming_its_param_before_any_work(loaded, settings, param, message):
    """A wrong type, a million-choice list counted before a string is read, a list of adapters that are not names."""
    with pytest.raises(mp.InputError) as e:
        mp.batch_generate(*loaded, [CAT, CAT], ["caption en"] * 2, **settings)
    assert e.value.param == param and str(e.value) == message


@pytest.mark.parametrize("call, param, message", [
    (lambda m, p: mp.generate(m, p, CAT, "caption en", kv_bits=3), "kv_bits", "kv_bits must be 4 or 8, got 3"),
    (lambda m, p: mp.generate(m, p, "no-such.jpg", "caption en"), "images", "image not found: no-such.jpg"),
    (lambda m, p: mp.batch_generate(m, p, [CAT, "no-such.jpg"], ["caption en"] * 2), "images",
     "prompt 1: image not found: no-such.jpg"),
    (lambda m, p: mp.score(m, p, CAT, "caption en", ["a cat"], exclude_eos=True), "exclude_eos",
     "score() got an unknown keyword exclude_eos: did you mean include_eos=False?"),
    (lambda m, p: mp.generate(m, p, CAT, "caption en", max_new_tokens=3), "max_new_tokens",
     "generate() got an unknown keyword max_new_tokens: did you mean max_tokens?"),
])
def test_every_refusal_names_its_param(loaded, call, param, message):
    """A missing image, kv_bits 3, a neighbour's keyword: one line whose param names what to fix."""
    with pytest.raises(mp.InputError) as e:
        call(*loaded)
    assert e.value.param == param and str(e.value) == message


def test_deterministic_is_the_keyword_and_batch_invariant_warns_for_one_release(loaded):
    """`deterministic`, as on the command lines and the server; the previous release's batch_invariant still runs."""
    model, processor = loaded
    want = mp.generate(model, processor, CAT, "caption en", max_tokens=6, deterministic=True)
    with pytest.warns(DeprecationWarning, match="batch_invariant= is now deterministic="):
        old = mp.generate(model, processor, CAT, "caption en", max_tokens=6, batch_invariant=True)
    assert old.tokens == want.tokens
    pieces = list(mp.stream_generate(model, processor, CAT, "caption en", max_tokens=6, deterministic=True))
    assert [p.token for p in pieces] == want.tokens
    assert mp.batch_generate(model, processor, [CAT], ["caption en"], max_tokens=6, deterministic=True).texts == \
        [want.text]
