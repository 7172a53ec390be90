"""The one KV cache from prefill to decode (generation/kv_buffers.py): rows of different lengths, and a row's tail
dropped. Decoding tokens a, b, c and then dropping b and c gives, for the next token, the logits of decoding a
alone; the other rows of the batch go on as if nothing happened."""

import mlx.core as mx
import numpy as np

from conftest import images_of
from mlx_paligemma.generation.engine import Engine
from mlx_paligemma.generation.kv_buffers import decode_step
from mlx_paligemma.generation.prefill import Prefill


def prefilled(engine, model, prompts):
    """KV buffers of the prompts (one row each), prefilled together."""
    rows = []
    for images, text in prompts:
        engine.submit(images, text, max_tokens=8)
    rows, engine.waiting = engine.waiting, []
    prefill = Prefill(model, rows, engine.features, engine.pad_id, None, 64)
    while not prefill.done:
        prefill.advance()
    return prefill.kv


def decode(model, kv, tokens):
    """One decode step of every row (tokens: one each): its logits."""
    kv.reserve()
    step = decode_step(model, None, 64)
    logits, kv.keys, kv.values = step(mx.array(tokens), mx.array(kv.length), mx.array(kv.left_padding), kv.keys,
                                      kv.values, mx.full((len(tokens),), -1, dtype=mx.int32))
    kv.length += 1
    return np.array(logits)


def test_a_trimmed_row_continues_as_if_its_tail_was_never_decoded(loaded, cases):
    model, processor = loaded
    engine = Engine(model, processor, batch_size=4)
    (images,) = images_of(cases["single"])
    prompts = [(images, "caption en"), (images, "answer en what is in the picture?")]
    a, b, c, x = 100, 200, 300, 400

    together = prefilled(engine, model, prompts)
    assert len(set(together.lengths)) == 2  # rows of different lengths
    decode(model, together, [a, a])
    decode(model, together, [b, b])
    decode(model, together, [c, c])
    before = together.lengths
    together.trim([2, 0])  # row 0 takes back b and c; row 1 keeps them
    assert together.lengths == [before[0] - 2, before[1]]
    trimmed = decode(model, together, [x, x])

    short = prefilled(engine, model, prompts)
    decode(model, short, [a, a])
    expected_0 = decode(model, short, [x, x])[0]
    long = prefilled(engine, model, prompts)
    for t in (a, b, c):
        decode(model, long, [t, t])
    expected_1 = decode(model, long, [x, x])[1]
    np.testing.assert_allclose(trimmed[0], expected_0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(trimmed[1], expected_1, atol=1e-5, rtol=0)
    assert np.abs(trimmed[0] - expected_1).max() > 1e-3  # the tail made a difference: the trim undid it
