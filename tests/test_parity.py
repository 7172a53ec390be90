"""Exactness against transformers on the same weights: processor, logits, greedy tokens, loss."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import images_of
from mlx_paligemma import generate_tokens
from mlx_paligemma.models.paligemma import suffix_loss

CASES = ["single", "gray", "rgba", "odd", "two_images", "batch", "suffix"]


def run_processor(processor, case):
    text = case["text"] if len(case["text"]) > 1 else case["text"][0]
    return processor(images=images_of(case), text=text, suffix=case.get("suffix"))


@pytest.mark.parametrize("name", CASES)
def test_processor_matches_transformers(loaded, reference, cases, name):
    _, processor = loaded
    batch = run_processor(processor, cases[name])
    for key in ["input_ids", "attention_mask", "token_type_ids"] + (["labels"] if f"{name}/labels" in reference else []):
        np.testing.assert_array_equal(np.array(batch[key]), reference[f"{name}/{key}"], err_msg=key)
    # Same PIL resize and the same float steps: the pixels are bit for bit the reference's.
    np.testing.assert_array_equal(np.array(batch["pixel_values"]), reference[f"{name}/pixel_values"])


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(loaded, reference, name):
    model, _ = loaded
    mask = mx.array(reference[f"{name}/attention_mask"])
    logits = model(
        mx.array(reference[f"{name}/input_ids"]), mx.array(reference[f"{name}/pixel_values"]),
        attention_mask=mask, token_type_ids=mx.array(reference[f"{name}/token_type_ids"]),
    )
    real = np.array(mask).astype(bool)  # padded positions are not compared
    expected = reference[f"{name}/logits"]
    np.testing.assert_allclose(np.array(logits)[real], expected[real], atol=1e-4, rtol=0)
    # Generation asks for the last position only (rows are left-padded, so it is always a real token).
    last = model(
        mx.array(reference[f"{name}/input_ids"]), mx.array(reference[f"{name}/pixel_values"]),
        attention_mask=mask, token_type_ids=mx.array(reference[f"{name}/token_type_ids"]), logits_to_keep=1,
    )
    np.testing.assert_allclose(np.array(last)[:, 0], expected[:, -1], atol=1e-4, rtol=0)


def test_image_features_match_transformers(loaded, reference):
    model, _ = loaded
    features = model.encode_images(mx.array(reference["single/pixel_values"]))
    np.testing.assert_allclose(np.array(features), reference["single/image_features"], atol=1e-5, rtol=0)


def greedy(model, input_ids, pixel_values, attention_mask=None, max_tokens=12):
    steps = generate_tokens(model, input_ids, pixel_values, attention_mask, max_tokens=max_tokens)
    return np.stack([np.array(t) for t in steps], axis=1)


def until_eos(tokens, eos):
    tokens = list(tokens)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("name", ["single", "gray", "rgba", "odd", "two_images", "batch"])
def test_greedy_tokens_match_transformers(loaded, reference, cases, name):
    model, processor = loaded
    expected = reference[f"{name}/generated"]
    ours = greedy(model, mx.array(reference[f"{name}/input_ids"]), mx.array(reference[f"{name}/pixel_values"]),
                  mx.array(reference[f"{name}/attention_mask"]), max_tokens=expected.shape[1])
    eos = processor.tokenizer.eos_id
    for row_ours, row_ref in zip(ours, expected):
        assert until_eos(row_ours, eos) == until_eos(row_ref, eos)


def test_padded_batch_rows_equal_unpadded_runs(loaded, cases):
    model, processor = loaded
    case = cases["batch"]
    batch = run_processor(processor, case)
    padded_logits = np.array(model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"]))
    padded_tokens = greedy(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    n_pads = (np.array(batch["attention_mask"]) == 0).sum(axis=1)
    assert n_pads.max() > 0, "the case must pad one row"
    for row, (images, text) in enumerate(zip(images_of(case), case["text"])):
        single = processor(images=[images], text=text)
        logits = np.array(model(single["input_ids"], single["pixel_values"]))
        np.testing.assert_allclose(padded_logits[row, n_pads[row]:], logits[0], atol=1e-4, rtol=0)
        assert padded_tokens[row].tolist() == greedy(model, single["input_ids"], single["pixel_values"])[0].tolist()


def test_suffix_loss_matches_transformers(loaded, reference):
    model, _ = loaded
    logits = model(
        mx.array(reference["suffix/input_ids"]), mx.array(reference["suffix/pixel_values"]),
        attention_mask=mx.array(reference["suffix/attention_mask"]),
        token_type_ids=mx.array(reference["suffix/token_type_ids"]),
    )
    loss = suffix_loss(logits, mx.array(reference["suffix/labels"])).item()
    assert abs(loss - float(reference["suffix/loss"])) < 1e-4


def test_decode_skips_special_and_padded_vocabulary_ids(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    text_ids = tok.encode("a cat")
    rows = model.language_model.model.embed_tokens.weight.shape[0]
    assert rows > tok.vocab_size, "the fixture pads the embedding like the real 257216-row one"
    ids = [tok.bos_id] + text_ids + [tok.image_id, rows - 1, tok.eos_id]
    assert processor.decode(ids) == "a cat"


def test_prefill_in_query_chunks_is_exact(loaded, reference, monkeypatch):
    import mlx_paligemma.models.language as language

    model, _ = loaded
    inputs = [mx.array(reference[f"batch/{k}"]) for k in ("input_ids", "pixel_values", "attention_mask")]
    whole = np.array(model(*inputs))
    monkeypatch.setattr(language, "ATTENTION_CHUNK", 7)  # several chunks, none aligned with the prefix
    assert inputs[0].shape[1] > 3 * 7
    # Not bitwise: BLAS blocks a 7-row product differently from a 28-row one (OpenBLAS 0.3.21 here), so the
    # chunked scores round differently; float32 rounding is what "exact" means everywhere else too.
    np.testing.assert_allclose(np.array(model(*inputs)), whole, rtol=0, atol=1e-5)


def test_image_features_computed_once_give_the_same_tokens(loaded, reference):
    model, _ = loaded
    ids, pixels = mx.array(reference["two_images/input_ids"]), mx.array(reference["two_images/pixel_values"])
    features = model.encode_images(pixels)
    cached = [t.item() for t in generate_tokens(model, ids, image_features=features, max_tokens=8)]
    assert cached == greedy(model, ids, pixels, max_tokens=8)[0].tolist()
