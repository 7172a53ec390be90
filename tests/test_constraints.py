"""Structured output: the masks of mlx_paligemma.generation.constraints keep the tiny random checkpoints' answers (noise
otherwise) inside a JSON schema, a regex, a list of choices and the detect/segment grammar, on both tokenizer kinds.

The decode loop here is the test's own, a few lines, only to drive the mask with the model's real logits (the
package's one decode loop is the engine's)."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_paligemma as mp
from mlx_paligemma.generation.constraints import make_constraint, masks
from mlx_paligemma.tasks.detection import parse_detections
from mlx_paligemma.errors import InputError
from mlx_paligemma.processing.processor import PaliGemmaProcessor

from conftest import FIXTURES, MODELS

IMAGES = ["chelsea.jpg", "coffee.jpg", "gray.png"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "cup", "none"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "kind"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{1,3} [a-z]{1,8}"
LOC = re.compile(r"<loc(\d{4})>")


@pytest.fixture(scope="module", params=[(m, kind) for m in MODELS for kind in ("tokenizer.json", "tokenizer.model")
                                        if (FIXTURES / m / kind).is_file()],
                ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request, tmp_path_factory):
    """(model, processor) with the tokenizer of the kind asked for: a sentencepiece-only folder holds just
    tokenizer.model beside the processor's files."""
    name, kind = request.param
    model, processor = mp.load(str(FIXTURES / name))
    if kind == "tokenizer.model":
        folder = tmp_path_factory.mktemp("sentencepiece")
        for f in FIXTURES.joinpath(name).iterdir():
            if f.name != "tokenizer.json":
                shutil.copy(f, folder / f.name)
        processor = PaliGemmaProcessor.from_pretrained(folder, model.config)
    return model, processor


def decode(model, processor, prompt, image, constraint=None, seed=None, max_tokens=120, temperature=1.0):
    """Greedy (seed None) or seeded sampling of one answer, masked by `constraint`: (token ids, ended by eos)."""
    inputs = processor(images=[image], text=prompt)
    cache = model.make_cache()
    logits = model(inputs["input_ids"], inputs["pixel_values"], cache=cache, logits_to_keep=1)[:, -1]
    key = None if seed is None else mx.random.key(seed)
    eos, out = processor.tokenizer.eos_id, []
    for _ in range(max_tokens):
        allowed = masks([constraint], logits.shape[-1])
        if allowed is not None:
            logits = mx.where(allowed, logits, -mx.inf)
        if key is None:
            token = int(mx.argmax(logits, axis=-1).item())
        else:
            key, sub = mx.random.split(key)
            token = int(mx.random.categorical(logits / temperature, key=sub).item())
        if constraint is not None:
            constraint.advance(token)
        if token == eos:
            return out, True
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache, logits_to_keep=1)[:, -1]
    return out, False


def image(i):
    return str(FIXTURES / "images" / IMAGES[i % len(IMAGES)])


def check_schema(value):
    """SCHEMA by hand (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and set(value) <= {"name", "count", "kind", "ok"}
    assert {"name", "count", "kind"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["count"]) is int and 0 <= value["count"] <= 99
    assert value["kind"] in ("cat", "cup", "none")
    assert type(value.get("ok", True)) is bool


def check_detect(text, classes, segment=False):
    """The whole answer is objects joined by ' ; ', each parsed by mlx_paligemma.tasks.detection with its label among
    the prompt's classes and ordered bins."""
    pieces = [p for p in text.split(" ; ")] if text else []
    objects = parse_detections(text, (1024, 1024))
    assert len(objects) == len(pieces), text
    for piece, o in zip(pieces, objects):
        y0, x0, y1, x1 = (int(v) for v in LOC.findall(piece)[:4])
        assert y0 < y1 and x0 < x1, piece
        assert o.label in classes, piece
        assert (o.codes is not None and len(o.codes) == 16) == segment, piece


@pytest.mark.parametrize("form", ["schema", "json_object", "regex", "choices", "detect", "segment"])
def test_constrained_answers_parse(setup, form):
    """Over several prompts, images and seeds (greedy and sampled), every answer that ends is valid for its
    constraint; the unconstrained answers of these noise models are not."""
    model, processor = setup
    tok = processor.tokenizer
    prompts = {"detect": ["detect cat ; dog", "detect coffee cup ; saucer ; spoon", "detect face"],
               "segment": ["segment cat", "segment cup ; plate"]}.get(form, ["answer en what is this?", "caption en",
                                                                            "describe the picture"])
    ended = 0
    for i, prompt in enumerate(prompts):
        for seed in (None, 1, 2):
            kw = {"schema": dict(json_schema=SCHEMA), "json_object": dict(response_format={"type": "json_object"}),
                  "regex": dict(regex=REGEX), "choices": dict(choices=["a cat", "a cup of coffee", "nothing"]),
                  }.get(form, dict(constrain=True))
            constraint = make_constraint(processor, model.config.text_config.vocab_size, prompt, **kw)
            ids, done = decode(model, processor, prompt, image(i + (seed or 0)), constraint, seed)
            text = tok.decode(ids)
            if not done:
                continue  # cut by max_tokens: the test only judges answers the grammar let end
            ended += 1
            if form == "schema":
                check_schema(json.loads(text))
            elif form == "json_object":
                assert isinstance(json.loads(text), dict)
            elif form == "regex":
                assert re.fullmatch(REGEX, text), text
            elif form == "choices":
                assert text in ("a cat", "a cup of coffee", "nothing")
            else:
                classes = [c.strip() for c in prompt.split(" ", 1)[1].split(";")]
                check_detect(text, classes, segment=form == "segment")
    assert ended >= len(prompts) * 3 // 2  # most rows end: the check above is not vacuous


def test_conforming_greedy_answer_unchanged(setup):
    """A constraint that the unconstrained greedy answer already satisfies gives back that answer, token for
    token: with any text allowed, and with the answer among choices. The noise models soon write a byte that
    is half a character or a special token (no text grammar writes those), so the answers judged are their
    longest clean beginnings, decoded for as many tokens."""
    model, processor = setup
    tok, vocab_size = processor.tokenizer, model.config.text_config.vocab_size
    checked = 0
    for i, prompt in enumerate(["caption en", "answer en what is on the table?", "detect cat", "ocr",
                                "describe", "question: how many?"]):
        for j in range(3):
            ids, _ = decode(model, processor, prompt, image(i + j), max_tokens=24)
            n = 0
            while n < len(ids) and ids[n] not in tok.specials.values() and "\ufffd" not in tok.decode(ids[:n + 1]):
                n += 1
            if n < 3:
                continue
            text = tok.decode(ids[:n])
            for kw in (dict(regex=r"[\s\S]*"), dict(choices=[text, "nothing", "zz" + text])):
                constraint = make_constraint(processor, vocab_size, prompt, **kw)
                got, _ = decode(model, processor, prompt, image(i + j), constraint, max_tokens=n)
                assert got == ids[:n], (prompt, kw)
            checked += 1
            if checked == 2:
                return
    pytest.fail(f"only {checked} clean greedy beginnings to judge")


@pytest.mark.parametrize("kw, names", [
    (dict(json_schema='{"type": "object",'), "not valid JSON"),
    (dict(json_schema={"type": "strin"}), "strin"),
    (dict(json_schema=[1]), "JSON object"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "json_schema"),
    (dict(regex="(ab"), "unclosed group"),
    (dict(regex=r"[^\s\S]"), "matches no answer"),
    (dict(regex="a", choices=["a"]), "regex and choices"),
    (dict(choices=[]), "choices"),
    (dict(choices="yes,no"), "choices"),
    (dict(constrain=True, prompt="detect"), "needs classes"),
    (dict(constrain=True, prompt="detect cat ; ; dog"), "cannot be a label"),
    (dict(constrain=True, prompt="detect cat ; dog", labels=["cow"]), "'cow' is not among"),
    (dict(labels=["cat"], prompt="detect cat"), "constrain=True"),
])
def test_bad_constraints_are_one_line(setup, kw, names):
    model, processor = setup
    with pytest.raises(InputError) as e:
        make_constraint(processor, model.config.text_config.vocab_size, **kw)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_mask_shape_eos_and_fork(setup):
    """The mask covers the model's padded vocabulary (ids past the tokenizer's never allowed), allows <eos>
    exactly where the answer may end, and a copy keeps its own state."""
    model, processor = setup
    tok, vocab_size = processor.tokenizer, model.config.text_config.vocab_size
    assert vocab_size > tok.vocab_size  # the fixtures' embeddings are padded
    assert make_constraint(processor, vocab_size, "caption en", constrain=True) is None
    assert make_constraint(processor, vocab_size, "detect cat") is None
    assert masks([None, None], vocab_size) is None  # unconstrained batches keep their path
    c = make_constraint(processor, vocab_size, choices=["cat", "cats"])
    m = np.array(c.allowed())
    assert m.shape == (vocab_size,) and not m[tok.vocab_size:].any() and not m[tok.eos_id]
    for t in tok.encode("cat"):
        assert c.allowed_np()[t]
        c.advance(t)
    fork = c.copy()
    assert c.allowed_np()[tok.eos_id] and not c.done  # "cat" may end or go on to "cats"
    fork.advance(tok.encode("s")[0])
    assert fork.done and np.flatnonzero(fork.allowed_np()).tolist() == [tok.eos_id]
    assert not c.done and c.allowed_np()[tok.encode("s")[0]]
    both = np.array(masks([c, None, fork], vocab_size))
    assert both[1].all() and (both[0] == c.allowed_np()).all() and (both[2] == fork.allowed_np()).all()


def test_detect_boxes_are_ordered(setup):
    """The detect mask allows y1 and x1 only above y0 and x0, which stop at 1022; labels only the prompt's."""
    model, processor = setup
    tok, vocab_size = processor.tokenizer, model.config.text_config.vocab_size
    loc = [tok.piece_to_id(f"<loc{k:04d}>") for k in range(1024)]
    c = make_constraint(processor, vocab_size, "detect cat ; dog", constrain=True, labels=["dog"])
    assert c.allowed_np()[tok.eos_id]  # zero objects is an answer
    for first, bin_ in ((True, 500), (True, 7), (False, 500), (False, 7)):
        m = c.allowed_np()
        assert m[loc].sum() == (1023 if first else 1023 - (500 if bin_ == 500 else 7))
        assert not m[loc[1023]] if first else not m[loc[bin_]]
        c.advance(loc[bin_ + (0 if first else 1)] if not first else loc[bin_])
    ids = tok.encode(" dog")
    assert not c.allowed_np()[tok.encode(" cat")[0]] or tok.encode(" cat")[0] == ids[0]
    for t in ids:
        c.advance(t)
    assert c.allowed_np()[tok.eos_id]
    text = tok.decode([loc[500], loc[7], loc[501], loc[8], *ids])
    assert [(o.label, o.box) for o in parse_detections(text, (1024, 1024))] == [("dog", (7.0, 500.0, 8.0, 501.0))]


def test_forced_text_in_any_spelling(setup):
    """Where the grammar fixes the next bytes, every spelling of them is allowed, not only the first token of
    their canonical tokenization (llguidance's own mask): the loc token that spans the end of a shorter choice,
    the byte-fallback token of a letter."""
    model, processor = setup
    tok, vocab_size = processor.tokenizer, model.config.text_config.vocab_size
    c = make_constraint(processor, vocab_size, choices=["3<loc0798>L", "3<loc07"])
    c.advance(tok.encode("3")[0])
    allowed = c.allowed_np()
    assert allowed[tok.piece_to_id("<loc0798>")] and allowed[tok.piece_to_id("<0x3C>")]
    assert not allowed[tok.piece_to_id("<loc0799>")]
    c = make_constraint(processor, vocab_size, choices=["q"])
    assert c.allowed_np()[tok.piece_to_id("<0x71>")]
