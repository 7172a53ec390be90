"""Seeded sampling against mlx-lm's sampler: the same logits, the same keys, the same tokens.

Ours: `stream_generate(..., temperature, top_p, top_k, min_p, seed)`, whose row draws from `mx.random.key(seed)`,
split once a token. The reference: mlx-lm's `make_sampler(temp, top_p, min_p, top_k=...)` (its filters, its order,
its temperature) given to `generate_tokens` after `mx.random.seed(seed)`, so that its draws come from MLX's global
generator with the same key sequence, on the logits of the same model and prompt. Every filter is shown to change
the answer (against the same seed without it), so an engine that ignored one could not pass.
"""

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

import mlx_paligemma as mp
from conftest import FIXTURES
from mlx_paligemma.api import generate_tokens

IMAGE = str(FIXTURES / "images" / "chelsea.jpg")
PROMPT = "caption en"
TOKENS = 12
SEEDS = range(3)
FILTERS = [dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(top_p=0.5, min_p=0.3, top_k=20)]


def ours(model, processor, seed, temperature, **filters):
    return [r.token for r in mp.stream_generate(model, processor, IMAGE, PROMPT, max_tokens=TOKENS,
                                                temperature=temperature, seed=seed, **filters)]


def mlx_lms(model, processor, seed, temperature, **filters):
    batch = processor(images=IMAGE, text=PROMPT)
    mx.random.seed(seed)
    sampler = make_sampler(temperature, **filters)  # its top_p default (0.0) and ours (1.0) both mean "off"
    return [int(t.item()) for t in generate_tokens(model, batch["input_ids"], batch["pixel_values"], sampler=sampler,
                                                 max_tokens=TOKENS)]


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_seeded_sampling_equals_mlx_lms_sampler(loaded, filters, temperature):
    model, processor = loaded
    changed = 0
    for seed in SEEDS:
        got = ours(model, processor, seed, temperature, **filters)
        expected = mlx_lms(model, processor, seed, temperature, **filters)
        # Ours stops at eos, generate_tokens does not: its answer is its tokens up to the first eos, all of them.
        eos = processor.tokenizer.eos_id
        answer = expected[: expected.index(eos) + 1] if eos in expected else expected
        assert got == answer, (seed, got, expected)
        changed += expected != mlx_lms(model, processor, seed, temperature)
    # The filter matters on this model: without it the same keys draw other tokens.
    assert changed == len(SEEDS), f"{filters} did not change the sampled tokens"

