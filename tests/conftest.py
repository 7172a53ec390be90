"""Tiny random checkpoints of the real architecture, written by transformers, and transformers' outputs on them.

tests/make_reference.py writes them (it needs torch and transformers; the tests do not). Set
PALIGEMMA_FIXTURES to a freshly generated folder to test against a live run of transformers.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(os.environ.get("PALIGEMMA_FIXTURES", Path(__file__).parent / "fixtures"))
MODELS = ["paligemma-tiny", "paligemma2-tiny"]


@pytest.fixture(scope="session")
def cases():
    return {c["name"]: c for c in json.loads((FIXTURES / "reference" / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="session", params=MODELS)
def model_name(request):
    return request.param


@pytest.fixture(scope="session")
def loaded(model_name):
    import mlx_paligemma as mp

    return mp.load(str(FIXTURES / model_name))


@pytest.fixture(scope="session")
def reference(model_name):
    data = np.load(FIXTURES / "reference" / f"{model_name}.npz")
    return {k: data[k] for k in data.files}


def images_of(case):
    return [[str(FIXTURES / "images" / f) for f in row] for row in case["images"]]


def scored_objects(processor, generation, size, mask_decoder=None):
    """The objects_to_json of a Generation (generate(..., logprobs=0)) about an image of `size`, each scored by its
    tokens' log-probabilities: what every surface returning objects should give for that answer."""
    from mlx_paligemma.tasks.detection import objects_to_json, parse_detections, token_ends

    ends = token_ends(generation.tokens, processor.tokenizer.decode)
    return objects_to_json(parse_detections(generation.text, size, mask_decoder, ends, generation.logprobs))
