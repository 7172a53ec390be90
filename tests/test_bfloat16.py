"""bfloat16 keeps float32 where docs/SPEED.md says ("bfloat16 against float32"): the residual streams of both
towers and Gemma 2's soft-capped logits, while every matmul still takes bfloat16 (a float32 input would upcast
the weights, and slow decoding). And the logits stay within bfloat16 rounding of transformers' float32 ones on
the same weights. The full-size comparison with transformers' own bfloat16 is benchmarks/numerics.py (torch,
13 GB per run; not a test)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma.models import language, vision


@pytest.fixture(scope="module")
def bf16(model_name):
    return model_name, mp.load(str(FIXTURES / model_name), dtype=mx.bfloat16)[0]


def recording(monkeypatch, cls, seen, name, inputs=False):
    """Wrap cls.__call__ to note the dtype of its first input or of its output under `name`."""
    call = cls.__call__

    def wrapped(self, x, *args, **kwargs):
        out = call(self, x, *args, **kwargs)
        seen.setdefault(name, set()).add((x if inputs else out).dtype)
        return out

    monkeypatch.setattr(cls, "__call__", wrapped)


def test_streams_in_float32_matmuls_in_bfloat16(bf16, reference, monkeypatch):
    name, model = bf16
    seen = {}
    recording(monkeypatch, vision.Embeddings, seen, "vision stream in")
    recording(monkeypatch, vision.EncoderLayer, seen, "vision stream")
    recording(monkeypatch, language.DecoderLayer, seen, "decoder stream")
    recording(monkeypatch, language.RMSNorm, seen, "norm outputs")
    recording(monkeypatch, nn.Linear, seen, "linear inputs", inputs=True)
    features = model.encode_images(mx.array(reference["single/pixel_values"]))
    logits = model(mx.array(reference["single/input_ids"]), image_features=features)
    assert features.dtype == mx.bfloat16
    assert seen["vision stream in"] == seen["vision stream"] == seen["decoder stream"] == {mx.float32}
    assert seen["norm outputs"] == seen["linear inputs"] == {mx.bfloat16}
    # Gemma 2's soft-cap computes in float32 and its result is not rounded; Gemma 1's head returns bfloat16.
    assert logits.dtype == (mx.float32 if name == "paligemma2-tiny" else mx.bfloat16)


@pytest.mark.parametrize("case", ["single", "suffix", "two_images"])
def test_logits_within_bfloat16_rounding_of_transformers_float32(bf16, reference, case):
    # Measured on these models: mean |error| 0.013-0.028, max 0.10-0.32 (logits up to 6.8). A wrong scale, a
    # dropped bias or a norm's 1 + w lost to rounding moves them by whole units.
    _, model = bf16
    mask = mx.array(reference[f"{case}/attention_mask"])
    logits = model(mx.array(reference[f"{case}/input_ids"]), mx.array(reference[f"{case}/pixel_values"]),
                   attention_mask=mask, token_type_ids=mx.array(reference[f"{case}/token_type_ids"]))
    real = np.array(mask).astype(bool)
    error = np.abs(np.array(logits.astype(mx.float32)) - reference[f"{case}/logits"])[real]
    assert error.mean() <= 0.04 and error.max() <= 0.5, (error.mean(), error.max())
