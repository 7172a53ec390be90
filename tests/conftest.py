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
# Set before the package is first imported: on a Linux machine without OpenBLAS, `import mlx_paligemma` prints one
# line, which would be one more stderr line in every command a test runs (tests/test_first_steps.py checks the line).
os.environ.setdefault("MLX_PALIGEMMA_QUIET_BLAS", "1")


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


def hand_objects(processor, generation, size):
    """The objects of a detect answer, worked out here from its tokens by the answer format's definition (not by
    the package's reader): each object is four <locNNNN> tokens (y0, x0, y1, x1 in 1024 bins of the image's height
    and width) then its label's tokens up to the ";" between objects; its score is the mean probability of those
    location and label tokens (tokens of spaces alone are no part of the label); boxes in pixels, rounded as JSON
    gives them. `generation` is the API's result with logprobs."""
    import math
    import re

    width, height = size
    pieces = [processor.tokenizer.decode([t]) for t in generation.tokens]
    objects, i = [], 0
    while i + 4 <= len(pieces):
        bins = [re.fullmatch(r"<loc(\d{4})>", p) for p in pieces[i:i + 4]]
        if not all(bins):
            i += 1
            continue
        y0, x0, y1, x1 = (int(b.group(1)) / 1024 for b in bins)
        used, label, j = list(range(i, i + 4)), "", i + 4
        while j < len(pieces) and ";" not in pieces[j] and not pieces[j].startswith("<loc"):
            if pieces[j].strip():
                used.append(j)
            label += pieces[j]
            j += 1
        score = sum(math.exp(generation.logprobs[k]) for k in used) / len(used)
        objects.append({"label": label.strip(), "box": [round(min(v, 1) * s, 2) for v, s in
                                                        ((x0, width), (y0, height), (x1, width), (y1, height))],
                        "score": round(score, 6)})
        i = j
    return objects
