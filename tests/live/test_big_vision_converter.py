"""The big_vision import against transformers' own converter, on the fixtures' big_vision .npz files.

transformers' `slice_state_dict` (its converter scripts' function, copied unchanged into tests/live/hf_converters:
the scripts are not in its wheel) and our `formats.big_vision` read the same .npz; they must give the same
weights bit for bit, and both those of the checkpoint the .npz was written from (make_reference.py writes it by
running the converter backwards). With PALIGEMMA_FIXTURES pointing at a fresh make_reference.py run (CI's
reference step) this checks the freshly written files.
"""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from transformers import PaliGemmaConfig

from conftest import FIXTURES
from mlx_paligemma.formats import big_vision
from mlx_paligemma.processor import Tokenizer

CONVERTERS = Path(__file__).parent / "hf_converters"
SCRIPTS = {"paligemma-tiny": "convert_paligemma_weights_to_hf.py",
           "paligemma2-tiny": "convert_paligemma2_weights_to_hf.py"}
PATCH = "vision_tower.vision_model.embeddings.patch_embedding.weight"
EMBEDDING = "language_model.model.embed_tokens.weight"


def slice_state_dict(model_name):
    spec = importlib.util.spec_from_file_location(model_name.replace("-", "_"), CONVERTERS / SCRIPTS[model_name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.slice_state_dict


def widen(a: np.ndarray) -> np.ndarray:
    """bfloat16 as numpy stores it (2-byte void) -> the same values in float32, which the converter takes as is."""
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if a.dtype.kind == "V" else a


@pytest.fixture(scope="module", params=list(SCRIPTS))
def converted(request):
    name = request.param
    npz = FIXTURES / "big_vision" / f"{name}.npz"
    with np.load(npz) as f:
        arrays = {k.removeprefix("params/"): widen(f[k]) for k in f.files}
    config = PaliGemmaConfig.from_pretrained(FIXTURES / name)
    theirs = {k: v.float().numpy() for k, v in slice_state_dict(name)(arrays, config).items()}
    _, ours = big_vision.load(npz, Tokenizer(FIXTURES / name), json.loads((FIXTURES / name / "config.json").read_text()))
    ours = {k: np.array(v.astype(mx.float32)) for k, v in ours.items()}
    return name, theirs, ours


def test_our_import_equals_transformers_converter(converted):
    _, theirs, ours = converted
    theirs, ours = dict(theirs), dict(ours)
    lm_head = theirs.pop("language_model.lm_head.weight")
    assert np.array_equal(lm_head, theirs[EMBEDDING])  # tied: the same rows
    assert sorted(ours) == sorted(theirs), set(ours) ^ set(theirs)
    ours[PATCH] = ours[PATCH].transpose(0, 3, 1, 2)  # ours is MLX's conv layout (O, H, W, I), theirs PyTorch's OIHW
    # big_vision has no rows for <image> and the padding: transformers' script adds them at random after
    # slice_state_dict, ours as the mean (test_formats checks those).
    pieces = theirs[EMBEDDING].shape[0]
    assert ours[EMBEDDING].shape[0] > pieces
    ours[EMBEDDING] = ours[EMBEDDING][:pieces]
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and np.array_equal(ours[key], value), key


def old_name(key: str) -> str:
    # PaliGemma 2's hub checkpoints (and so its fixture) name the SigLIP tower without `vision_model.`; the
    # converter writes the older names.
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def test_transformers_converter_gives_back_the_checkpoint(converted):
    name, theirs, _ = converted
    # PaliGemma 2's .npz is bfloat16, as big_vision publishes it: the checkpoint rounded the same way.
    dtype = mx.bfloat16 if name == "paligemma2-tiny" else mx.float32
    stored = {old_name(k): np.array(v.astype(dtype).astype(mx.float32))
              for k, v in mx.load(str(FIXTURES / name / "model.safetensors")).items()}
    pieces = theirs[EMBEDDING].shape[0]
    stored[EMBEDDING] = stored[EMBEDDING][:pieces]
    theirs = {k: v for k, v in theirs.items() if k != "language_model.lm_head.weight"}
    assert sorted(stored) == sorted(theirs), set(stored) ^ set(theirs)
    for key, value in theirs.items():
        assert np.array_equal(stored[key], value), key
