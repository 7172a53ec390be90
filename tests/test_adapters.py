"""Many adapters on one base: every row, in a batch mixing the base and adapters of different ranks, layer sets and
scales, gets what its adapter gives loaded alone (load(..., adapter_path=)): greedy tokens identical,
log-probabilities to float32 rounding; on a float base and an 8-bit (QLoRA) one; bad adapters are one line."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

import mlx_paligemma as mp
from conftest import FIXTURES, MODELS
from mlx_paligemma.convert import convert, quantize
from mlx_paligemma.data.sources import read_training_sets
from mlx_paligemma.errors import InputError
from mlx_paligemma.models.adapters import (MAX_ADAPTERS, MultiLoRALinear, RowAdapters, adapter_set, add_adapter,
                                          row_adapters)
from mlx_paligemma.training import trainer

IMAGES = FIXTURES / "images"
# Two adapters taught different answers to the same prompts, so each row's answer shows which adapter it ran.
TEACH = {"cats": [("chelsea.jpg", "caption en", "a cat"), ("coffee.jpg", "caption en", "a cup of coffee")],
         "dogs": [("chelsea.jpg", "caption en", "two dogs on grass"), ("coffee.jpg", "caption en", "a dog")]}
# Different ranks, layer sets (all layers / attention of the last block) and scales.
SHAPES = {"cats": dict(rank=8, scale=20.0), "dogs": dict(rank=4, scale=10.0, layers=["attention"], num_layers=1)}
PROMPTS = [(str(IMAGES / image), prefix) for image, prefix, _ in TEACH["cats"]]


def write_data(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": str(IMAGES / i), "prefix": p, "suffix": s}) for i, p, s in rows]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def train_adapters(name, quantized, folder):
    """The base as a folder (float32, or 8-bit for QLoRA) and two adapters trained on it with the project's
    trainer: {"base": folder, "folders": {adapter: folder}, "quantized": ...}."""
    base = folder / "base"
    convert(str(FIXTURES / name), str(base), "float32", quantize_bits=8 if quantized else None, group_size=32)
    for adapter, rows in TEACH.items():
        model, processor = mp.load(str(FIXTURES / name), dtype=mx.float32)
        if quantized:
            quantize(model, group_size=32, bits=8)
        mx.random.seed(0)
        config = trainer.add_lora(model, **SHAPES[adapter])
        data = read_training_sets(str(write_data(folder / f"data-{adapter}", rows)))
        args = trainer.TrainingArgs(iters=30, batch_size=2, learning_rate=2e-3, steps_per_report=30,
                                    steps_per_eval=30, adapter_path=str(folder / adapter))
        trainer.train(model, processor, data["train"], data["valid"], args, adapter_config=config,
                      report=lambda s: None)
    return dict(base=str(base), folders={a: str(folder / a) for a in TEACH}, quantized=quantized)


@pytest.fixture(scope="module", params=[(m, q) for m in MODELS for q in (False, True)],
                ids=[f"{m}-{q}" for m in MODELS for q in ("lora", "qlora")])
def trained(request, tmp_path_factory):
    return train_adapters(*request.param, tmp_path_factory.mktemp("adapters"))


def loaded_alone(trained) -> dict:
    """Each adapter loaded alone, applied to the base (and the base with none): {name: (model, processor)}."""
    return {adapter: mp.load(trained["base"], dtype=mx.float32,
                             adapter_path=trained["folders"][adapter] if adapter else None)
            for adapter in [None, *TEACH]}


def texts_alone(trained) -> dict:
    """{adapter: the 8-token answers to PROMPTS} of each adapter loaded alone: what a command or the server must give."""
    return {adapter: [mp.generate(*loaded, image, prompt, max_tokens=8).text for image, prompt in PROMPTS]
            for adapter, loaded in loaded_alone(trained).items()}


@pytest.fixture(scope="module")
def alone(trained):
    """Each adapter loaded alone (and the base with none): the answers every mixed batch must reproduce."""
    answers = {}
    for adapter, (model, processor) in loaded_alone(trained).items():
        answers[adapter] = [mp.generate(model, processor, image, prompt, max_tokens=8, logprobs=0)
                            for image, prompt in PROMPTS]
        answers[adapter, "score"] = mp.score(model, processor, PROMPTS[0][0], PROMPTS[0][1], ["a cat", "a dog"])
        answers[adapter, "model"] = model, processor
    return answers


@pytest.fixture(scope="module")
def served(trained):
    return mp.load(trained["base"], dtype=mx.float32, adapters=trained["folders"])


def same(got, expected):
    assert got.tokens == expected.tokens and got.text == expected.text
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=2e-5, rtol=1e-5)


def test_adapters_are_loaded_unfused_beside_the_base(trained, served):
    model, _ = served
    quantized = nn.QuantizedLinear if trained["quantized"] else nn.Linear
    last = len(model.layers) - 1
    # cats adapts every linear of every block; dogs only the attention of the last one, beside cats there.
    assert isinstance(model.layers[0].mlp.down_proj, MultiLoRALinear)
    assert isinstance(model.layers[0].mlp.down_proj.linear, quantized)
    assert model.layers[0].self_attn.q_proj.owners == [-1, 0]
    assert model.layers[last].self_attn.q_proj.owners == [-1, 0, 1]
    assert model.layers[last].self_attn.q_proj.lora_a.shape[-1] == 8  # rank 4 padded to the layer's largest
    info = adapter_set(model).info
    for name, folder in trained["folders"].items():
        assert info[name]["bytes"] == sum(w.nbytes for w in mx.load(f"{folder}/adapters.safetensors").values())
    # cats, loaded first: each of its linears stacks a zero slot and its own factors, 2 scales and 17 slot indices.
    n = len(info["cats"]["layers"])
    assert n == 7 * len(model.layers) and info["cats"]["added_bytes"] == 2 * info["cats"]["bytes"] + n * (2 + 17) * 4
    # dogs' rank-4 factors join rank-8 stacks: padded to 8, twice their own size, and one more scale each.
    assert info["dogs"]["added_bytes"] == 2 * info["dogs"]["bytes"] + 4 * 4


def test_a_mixed_batch_gives_each_row_its_adapter_alone(served, alone):
    model, processor = served
    order = [None, "cats", "dogs", "dogs", None, "cats"]  # base rows among them, prompts repeated
    rows = [(order[i], PROMPTS[i % 2]) for i in range(len(order))]
    answers = mp.batch_generate(model, processor, [p[0] for _, p in rows], [p[1] for _, p in rows], max_tokens=8,
                                logprobs=0, adapter=[a for a, _ in rows], batch_size=6)
    for (adapter, prompt), got in zip(rows, answers):
        same(got, alone[adapter][PROMPTS.index(prompt)])
    # The adapters answer otherwise than the base and each other: the rows did go through different weights.
    assert alone["cats"][0].text == "a cat"
    assert len({tuple(alone[a][0].tokens) for a in (None, "cats", "dogs")}) == 3


def test_a_bfloat16_base_gives_each_row_its_adapter_alone(trained):
    """The dtype the GPU runs: the base in bfloat16 (quantized for QLoRA), the factors as trained (float32)."""
    model, processor = mp.load(trained["base"], dtype=mx.bfloat16, adapters=trained["folders"])
    order = ["cats", None, "dogs", "cats"]
    got = mp.batch_generate(model, processor, [PROMPTS[i % 2][0] for i in range(4)],
                            [PROMPTS[i % 2][1] for i in range(4)], max_tokens=8, logprobs=0, adapter=order)
    for i, adapter in enumerate(order):
        alone, _ = mp.load(trained["base"], dtype=mx.bfloat16,
                           adapter_path=trained["folders"][adapter] if adapter else None)
        same(got[i], mp.generate(alone, processor, *PROMPTS[i % 2], max_tokens=8, logprobs=0))


def test_generate_stream_and_score_take_an_adapter(served, alone):
    model, processor = served
    for adapter in ("dogs", None, "cats"):  # the compiled step is reused with other ids each call
        same(mp.generate(model, processor, *PROMPTS[1], max_tokens=8, logprobs=0, adapter=adapter), alone[adapter][1])
        streamed = [r.token for r in mp.stream_generate(model, processor, *PROMPTS[0], max_tokens=8, adapter=adapter)]
        assert streamed == alone[adapter][0].tokens
        scores = mp.score(model, processor, PROMPTS[0][0], PROMPTS[0][1], ["a cat", "a dog"], adapter=adapter)
        np.testing.assert_allclose(scores, alone[adapter, "score"], atol=1e-4)


def test_beams_and_constrained_rows_of_different_adapters_share_a_batch(served, alone):
    model, processor = served
    order = ["dogs", None, "cats"]
    for settings in (dict(num_beams=2, num_return_sequences=2), dict(regex="(a|two) [a-z ]+")):
        got = mp.batch_generate(model, processor, [PROMPTS[1][0]] * 3, [PROMPTS[1][1]] * 3, max_tokens=6,
                                adapter=order, **settings)
        for adapter, answer in zip(order, got):
            want = mp.generate(*alone[adapter, "model"], *PROMPTS[1], max_tokens=6, **settings)
            assert (answer.texts, answer.tokens) == (want.texts, want.tokens), adapter
            np.testing.assert_allclose(answer.logprobs, want.logprobs, atol=2e-5, rtol=1e-5)


def test_engine_rows_join_a_running_batch_of_another_adapter(served, alone):
    model, processor = served
    engine = mp.Engine(model, processor, batch_size=4)
    uids = {engine.submit(PROMPTS[0][0], PROMPTS[0][1], max_tokens=8, adapter="cats"): "cats"}
    tokens = {u: [] for u in uids}
    with engine.running():
        for step in range(40):
            if step == 2:  # joins while the cats row decodes
                uid = engine.submit(PROMPTS[0][0], PROMPTS[0][1], max_tokens=8, adapter="dogs")
                uids[uid], tokens[uid] = "dogs", []
            if not engine.has_work:
                break
            for out in engine.step():
                tokens[out.uid].append(out.token)
    assert all(tokens[u] == alone[a][0].tokens for u, a in uids.items())


def test_unknown_and_misfit_adapters_are_one_line(trained, served, tmp_path):
    model, processor = served
    with pytest.raises(InputError, match=r"^unknown adapter 'receipts': loaded adapters: cats, dogs$"):
        mp.generate(model, processor, *PROMPTS[0], adapter="receipts")
    with pytest.raises(InputError, match="one per prompt"):
        mp.batch_generate(model, processor, [PROMPTS[0][0]], [PROMPTS[0][1]], adapter=["cats", "dogs"])
    plain, _ = mp.load(trained["base"], dtype=mx.float32)
    with pytest.raises(InputError, match="this model has no adapters loaded"):
        mp.generate(plain, processor, *PROMPTS[0], adapter="cats")
    cats = trained["folders"]["cats"]
    with pytest.raises(InputError, match="not both"):
        mp.load(trained["base"], adapter_path=cats, adapters={"cats": cats})
    with pytest.raises(InputError, match=f"at most {MAX_ADAPTERS} adapters"):
        mp.load(trained["base"], adapters={f"a{i}": cats for i in range(MAX_ADAPTERS + 1)})

    weights = mx.load(f"{cats}/adapters.safetensors")
    config = open(f"{cats}/adapter_config.json").read()

    def folder(name, tensors):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        mx.save_safetensors(str(tmp_path / name / "adapters.safetensors"), tensors)
        return str(tmp_path / name)

    key = "language_model.model.layers.0.self_attn.q_proj.lora_a"
    misfit = folder("misfit", {**weights, key: mx.zeros((weights[key].shape[0] + 1, 8))})
    unknown = folder("unknown", {**weights, "language_model.model.layers.0.self_attn.x_proj.lora_a": weights[key]})
    vision = folder("vision", {"vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_a": weights[key]})
    for path, message in [(misfit, r"self_attn.q_proj: LoRA factors of shapes \(\d+, 8\) and \(8, \d+\) do not fit"),
                          (unknown, "self_attn.x_proj.lora_a is not a LoRA factor of a decoder linear"),
                          (vision, "adapt the decoder's linears only"), (str(tmp_path / "none"), "no such folder")]:
        with pytest.raises(InputError, match=message) as e:
            mp.load(trained["base"], adapters={"bad": path})
        assert "\n" not in str(e.value)


def test_a_row_through_each_adapter_equals_mlx_lm_lora_linear_alone():
    """The layer itself, on random factors of three ranks over a float and a quantized base: each row equals
    mlx-lm's LoRALinear of its adapter to float32 rounding, and a base row is the base's output exactly."""
    mx.random.seed(3)
    for quantized in (False, True):
        base = nn.Linear(64, 48, bias=False)
        if quantized:
            base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=8)
        layer = MultiLoRALinear(base, RowAdapters(), 64, 48)
        alone = []
        for index, (rank, scale) in enumerate([(2, 3.0), (8, 20.0), (5, 0.5)]):
            a, b = mx.random.normal((64, rank)) * 0.1, mx.random.normal((rank, 48)) * 0.1
            layer.put(index, a, b, scale)
            lora = LoRALinear.from_base(base, r=rank, scale=scale)
            lora.lora_a, lora.lora_b = a, b
            alone.append(lora)
        x = mx.random.normal((5, 3, 64))
        layer.rows.ids = mx.array([2, -1, 0, 1, 2], dtype=mx.int32)
        out = layer(x)
        for row, index in enumerate([2, -1, 0, 1, 2]):
            # A base row against the base on the same batch: BLAS may round another shape differently.
            expected = base(x)[row] if index < 0 else alone[index](x[row])
            if index < 0:
                assert mx.array_equal(out[row], expected).item()
            np.testing.assert_allclose(np.array(out[row]), np.array(expected), atol=1e-5, rtol=1e-5)
        layer.put(1, None, None, 0.0)  # dropping the rank-8 adapter shrinks the stack to rank 5
        assert layer.lora_a.shape == (3, 64, 5) and layer.owners == [-1, 0, 2]
        layer.rows.ids = mx.array([2, 0], dtype=mx.int32)
        np.testing.assert_allclose(np.array(layer(x[:2])[0]), np.array(alone[2](x[0])), atol=1e-5, rtol=1e-5)


def test_row_ids_are_an_input_of_a_compiled_call():
    layer = MultiLoRALinear(nn.Linear(16, 8, bias=False), RowAdapters(), 16, 8)
    layer.put(0, mx.ones((16, 2)), mx.ones((2, 8)), 1.0)
    model = nn.Module()
    model.layer = layer
    object.__setattr__(model, "_adapter_set", type("S", (), {"rows": layer.rows})())

    def call(x, ids):
        with row_adapters(model, ids):
            return layer(x)

    compiled = mx.compile(call, inputs=[model.state])
    x = mx.ones((2, 1, 16))
    first = compiled(x, mx.array([0, -1], dtype=mx.int32))
    second = compiled(x, mx.array([-1, 0], dtype=mx.int32))
    assert np.array(first[0] - first[1]).min() == 32 and np.array(second[1] - second[0]).min() == 32


def test_names_and_limits_are_checked_before_the_model_changes(served):
    model, _ = served
    weights = {"language_model.model.layers.0.self_attn.q_proj.lora_a": mx.zeros((3, 2)),
               "language_model.model.layers.0.self_attn.q_proj.lora_b": mx.zeros((2, 4))}
    for name, scale, message in [("cats", 1.0, "loaded already"), ("", 1.0, "1 to 64 characters"),
                                 ("x", float("nan"), "finite number"), ("x", 1.0, "do not fit")]:
        with pytest.raises(InputError, match=message):
            add_adapter(model, name, weights, scale)
    assert model.layers[0].self_attn.q_proj.owners == [-1, 0]
