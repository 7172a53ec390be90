"""The generation engine: rows of a batch, joining and leaving mid-run, against transformers and against runs alone."""

import random
from dataclasses import replace

import mlx.core as mx
import pytest

import mlx_paligemma as mp
from conftest import FIXTURES, images_of
from mlx_paligemma.generation.engine import Detokenizer, Engine, byte_ids
from mlx_paligemma.generation.prefill import Prefill
from mlx_paligemma.errors import InputError
from mlx_paligemma.processing.processor import PaliGemmaProcessor

GENERATION_CASES = ["single", "gray", "rgba", "odd", "two_images", "batch"]


def prompts_of(cases):
    """Every generation case as (name, row, images, prompt): mixed lengths, a two-image prompt, an `<image>` marker."""
    return [(name, row, images, text) for name in GENERATION_CASES
            for row, (images, text) in enumerate(zip(images_of(cases[name]), cases[name]["text"]))]


def run(engine):
    """Tokens and text of every request, by uid."""
    tokens, text = {}, {}
    with engine.running():
        while engine.has_work:
            for out in engine.step():
                tokens.setdefault(out.uid, []).append(out.token)
                text[out.uid] = text.get(out.uid, "") + out.text
    return tokens, text


def until_eos(tokens, eos):
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("prefill_tokens", [2048, 1])  # prompts prefilled together, or each alone
def test_rows_joining_and_leaving_match_transformers(loaded, reference, cases, prefill_tokens):
    model, processor = loaded
    engine = Engine(model, processor, batch_size=3, prefill_tokens=prefill_tokens)
    items = prompts_of(cases)
    # Different lengths make rows leave at different steps, so waiting prompts join a running batch.
    lengths = [12, 4, 9, 12, 6, 12, 7]
    uids = [engine.submit(images, text, max_tokens=n) for (_, _, images, text), n in zip(items, lengths)]
    joined_mid_run = []
    tokens, _ = {}, None
    with engine.running():
        while engine.has_work:
            before = {r.uid for r in engine.batch.rows} if engine.batch else set()
            for out in engine.step():
                tokens.setdefault(out.uid, []).append(out.token)
            if before and engine.batch:
                joined_mid_run += [r.uid for r in engine.batch.rows if r.uid not in before]
    assert joined_mid_run, "some prompts must join a batch that is already decoding"
    eos = processor.tokenizer.eos_id
    for uid, (name, row, _, _), n in zip(uids, items, lengths):
        expected = until_eos(reference[f"{name}/generated"][row][:n], eos)
        assert until_eos(tokens[uid], eos) == expected, (name, row)


def test_batch_generate_equals_generate_alone(loaded, cases):
    model, processor = loaded
    items = prompts_of(cases)
    images = [i for _, _, i, _ in items]
    prompts = [t for _, _, _, t in items]
    alone = [mp.generate(model, processor, i, t, max_tokens=10).text for i, t in zip(images, prompts)]
    assert mp.batch_generate(model, processor, images, prompts, max_tokens=10, batch_size=4).texts == alone
    assert mp.batch_generate(model, processor, images, prompts, max_tokens=10, batch_size=1).texts == alone


def test_seeded_sampling_is_the_same_in_any_batch(loaded, cases):
    model, processor = loaded
    items = prompts_of(cases)[:4]
    settings = dict(max_tokens=8, temperature=1.5, top_k=50, seed=7)

    def sampled(batch_size, order):
        engine = Engine(model, processor, batch_size=batch_size)
        uids = {engine.submit(items[i][2], items[i][3], **settings): i for i in order}
        tokens, _ = run(engine)
        return {uids[u]: t for u, t in tokens.items()}

    alone = {i: sampled(1, [i])[i] for i in range(4)}
    assert sampled(4, [0, 1, 2, 3]) == alone
    assert sampled(2, [3, 1, 0, 2]) == alone
    greedy = mp.generate(model, processor, items[0][2], items[0][3], max_tokens=8).text
    texts = {mp.generate(model, processor, items[0][2], items[0][3], temperature=1.5, seed=s, max_tokens=8).text
             for s in range(4)}
    assert len(texts | {greedy}) > 1, "sampling must change the answer of a random model"


def test_unseeded_sampling_follows_mx_random_seed(loaded, cases):
    model, processor = loaded
    _, _, images, text = prompts_of(cases)[0]
    answers = []
    for _ in range(2):
        mx.random.seed(3)
        answers.append(mp.generate(model, processor, images, text, temperature=1.0, max_tokens=8).text)
    assert answers[0] == answers[1]


def test_image_features_computed_once_per_distinct_image(loaded, cases):
    model, processor = loaded
    image = str(FIXTURES / "images" / "chelsea.jpg")
    other = str(FIXTURES / "images" / "coffee.jpg")
    engine = Engine(model, processor, batch_size=4)
    cache = engine.features
    cache.entries.clear()
    before = cache.images_encoded
    prompts = ["caption en", "answer en what is this?", "detect cat", "ocr"]
    uids = [engine.submit(image, p, max_tokens=6) for p in prompts] + [engine.submit([image, other], "ocr")]
    tokens, _ = run(engine)
    assert cache.images_encoded - before == 2
    # A later question about the same image through generate skips the vision tower too, with the same answer.
    first = tokens[uids[0]]
    answer = mp.generate(model, processor, image, prompts[0], max_tokens=6).text
    assert cache.images_encoded - before == 2
    assert answer == processor.decode(first)
    # New weights for the vision tower invalidate what was computed with the old ones.
    vision = model.vision_tower.parameters()
    try:
        model.vision_tower.update(mp_tree_map(lambda w: w * 1, vision))
        mp.generate(model, processor, image, prompts[0], max_tokens=1).text
        assert cache.images_encoded - before == 3
    finally:
        model.vision_tower.update(vision)


def mp_tree_map(fn, tree):
    from mlx.utils import tree_map

    return tree_map(fn, tree)


def test_stop_strings_end_the_row_and_are_not_shown(loaded, cases):
    model, processor = loaded
    _, _, images, text = prompts_of(cases)[0]
    full = mp.generate(model, processor, images, text, max_tokens=12).text
    assert len(full) > 4
    stop = full[2:4]
    cut = mp.generate(model, processor, images, text, max_tokens=12, stop=[stop, "never appears"]).text
    assert cut == full[: full.index(stop)]


def test_cancel_frees_the_row(loaded, cases):
    model, processor = loaded
    items = prompts_of(cases)
    engine = Engine(model, processor, batch_size=2)
    a = engine.submit(items[0][2], items[0][3], max_tokens=12)
    b = engine.submit(items[1][2], items[1][3], max_tokens=12)
    c = engine.submit(items[2][2], items[2][3], max_tokens=3)
    seen = {a: 0, b: 0, c: 0}
    with engine.running():
        for out in engine.step():
            seen[out.uid] += 1
        engine.cancel(a)
        while engine.has_work:
            for out in engine.step():
                seen[out.uid] += 1
    assert seen[a] == 1 and seen[c] == 3, "the cancelled row leaves and the waiting one takes its place"


def test_quantized_kv_cache_in_the_engine(loaded, cases):
    model, processor = loaded
    items = prompts_of(cases)[:3]
    images = [i for _, _, i, _ in items]
    prompts = [t for _, _, _, t in items]
    # The fixtures' head size is 16: the quantized cache needs groups of 32, so it is refused with one line.
    with pytest.raises(InputError, match="head size divisible by 32"):
        mp.batch_generate(model, processor, images, prompts, kv_bits=8).texts


def test_detokenizer_equals_decoding_everything(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    bytes_ = byte_ids(processor)
    assert len(bytes_) == 256
    rng = random.Random(0)
    texts = ["a cat on a sofa", "zwei Katzen 🐈 und ein Café", "<loc0012><loc0100> cat ; dog", "x\n\ny  z", "日本語"]
    sequences = [tok.encode(t) for t in texts]
    sequences += [[rng.randrange(tok.vocab_size + 64) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    for ids in sequences:
        detok = Detokenizer(tok.decode, bytes_)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids), ids


def test_detokenizer_with_the_sentencepiece_tokenizer(tmp_path):
    import shutil

    for f in ("tokenizer.model", "config.json", "preprocessor_config.json"):
        shutil.copy(FIXTURES / "paligemma-tiny" / f, tmp_path / f)
    processor = PaliGemmaProcessor.from_pretrained(tmp_path)
    tok, bytes_ = processor.tokenizer, byte_ids(processor)
    rng = random.Random(1)
    for text in ["a cat on a sofa", " leading space", "Café 🐈", "<loc0012> cat"]:
        ids = tok.encode(text)
        detok = Detokenizer(tok.decode, bytes_)
        assert "".join([detok.add(i) for i in ids] + [detok.flush()]) == tok.decode(ids)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        detok = Detokenizer(tok.decode, bytes_)
        assert "".join([detok.add(i) for i in ids] + [detok.flush()]) == tok.decode(ids)


@pytest.mark.parametrize("settings, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=-1), "seed"), (dict(stop=[""]), "stop"), (dict(logit_bias={10**9: 1.0}), "logit_bias"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_settings_are_one_line(loaded, settings, message):
    model, processor = loaded
    image = str(FIXTURES / "images" / "chelsea.jpg")
    with pytest.raises(InputError, match=message) as e:
        mp.batch_generate(model, processor, [image], ["caption en"], **settings).texts
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("settings", [{"max_tokens": 5}, None, "max_tokens=5", 5])
def test_a_request_takes_checked_settings_only(settings):
    """A Request's settings are check_settings' Settings: a dict or anything else is one line naming `settings`,
    before an engine sees it (no unchecked value reaches the strategies)."""
    from mlx_paligemma.generation.request import Request

    with pytest.raises(InputError, match="check_settings") as e:
        Request([2, 3], settings=settings)
    assert e.value.param == "settings" and "\n" not in str(e.value)


def test_logits_processors_change_tokens_as_documented(loaded, cases):
    model, processor = loaded
    _, _, images, text = prompts_of(cases)[0]
    engine = Engine(model, processor, batch_size=1)
    plain = engine.submit(images, text, max_tokens=12)
    tokens, _ = run(engine)
    first = tokens[plain][0]
    # A large negative bias on the greedy first token makes the model pick another one.
    engine = Engine(model, processor, batch_size=1)
    uid = engine.submit(images, text, max_tokens=8, logit_bias={first: -1e9})
    assert run(engine)[0][uid][0] != first
    # A strong repetition penalty keeps the answer from repeating a token within its context.
    engine = Engine(model, processor, batch_size=1)
    uid = engine.submit(images, text, max_tokens=12, repetition_penalty=1e6, repetition_context_size=12)
    penalised = run(engine)[0][uid]
    assert len(set(tokens[plain])) < len(tokens[plain]), "the greedy answer repeats a token"
    assert len(set(penalised)) == len(penalised)


def test_batch_generate_names_the_bad_prompt(loaded, tmp_path):
    model, processor = loaded
    image = str(FIXTURES / "images" / "chelsea.jpg")
    with pytest.raises(InputError, match=r"prompt 1: image not found"):
        mp.batch_generate(model, processor, [image, str(tmp_path / "missing.jpg")], ["caption en", "ocr"]).texts


def test_generation_runs_under_mlx_lm_wired_limit(loaded, cases, monkeypatch):
    """Memory is wired (on Apple silicon) while generating, by mlx-lm's own function, entered and left once per
    run; on this backend it is a no-op."""
    import contextlib
    import importlib

    generate_module = importlib.import_module("mlx_lm.generate")  # `mlx_lm.generate` is also a function
    model, processor = loaded
    calls = []
    original = generate_module.wired_limit

    @contextlib.contextmanager
    def recording(m, streams=None):
        calls.append("enter")
        with original(m, streams):
            yield
        calls.append("exit")

    monkeypatch.setattr(generate_module, "wired_limit", recording)
    _, _, images, text = prompts_of(cases)[0]
    mp.generate(model, processor, images, text, max_tokens=3).text
    assert calls == ["enter", "exit"]


@pytest.mark.parametrize("order", ["mlx_paligemma first", "mlx first"])
def test_cpu_fast_path_lost_to_import_order_is_said_once(order):
    """MLX binds its BLAS when imported: if mlx comes first, OpenBLAS cannot be given to it, and a line says so."""
    import ctypes.util
    import os
    import subprocess
    import sys

    imports = "import mlx_paligemma; import mlx.core" if order == "mlx_paligemma first" else \
        "import mlx.core; import mlx_paligemma; import mlx_paligemma.generate"
    env = {k: v for k, v in os.environ.items() if k != "MLX_PALIGEMMA_QUIET_BLAS"}  # the suite's quiet default
    r = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    late = order == "mlx first" and sys.platform == "linux" and ctypes.util.find_library("openblas") is not None
    notes = [line for line in r.stderr.splitlines() if "OpenBLAS" in line]
    assert len(notes) == (1 if late else 0), notes
    if late:
        assert notes[0].startswith("mlx_paligemma: mlx was imported before mlx_paligemma, too late to give it OpenBLAS")
        assert "import mlx_paligemma first, or run with LD_PRELOAD=" in notes[0]


def test_compiled_decode_sees_new_layers_and_weights():
    """The compiled step is kept on the model: LoRA layers added and weights changed after a first run are used,
    as a full forward pass without cache (the suffix causal, token_type_ids 1) computes them."""
    from mlx.utils import tree_map_with_path

    from mlx_paligemma.training import trainer

    model, processor = mp.load(str(FIXTURES / "paligemma2-tiny"))
    inputs = processor(images=str(FIXTURES / "images" / "chelsea.jpg"), text="caption en")

    def engine_tokens():
        return [int(t[0]) for t in mp.generate_tokens(model, inputs["input_ids"], inputs["pixel_values"], max_tokens=6)]

    base = engine_tokens()
    trainer.add_lora(model, rank=4)
    model.update(tree_map_with_path(lambda p, w: mx.random.normal(w.shape, key=mx.random.key(0)) * 0.5
                                    if p.endswith("lora_b") else w, model.parameters()))
    ids, expected = inputs["input_ids"], []
    for _ in range(6):
        types = mx.array([[0] * inputs["input_ids"].shape[1] + [1] * len(expected)])
        expected.append(int(mx.argmax(model(ids, inputs["pixel_values"], token_type_ids=types)[0, -1])))
        ids = mx.concatenate([ids, mx.array([[expected[-1]]])], axis=1)
    assert expected != base
    assert engine_tokens() == expected


def test_rows_end_when_the_context_is_full(loaded, cases):
    model, processor = loaded
    _, _, images, text = prompts_of(cases)[0]
    engine = Engine(model, processor, batch_size=2)
    prompt = len(processor(images=[images], text=text)["input_ids"][0])
    engine.vocab = replace(engine.vocab, context=prompt + 3)  # as if max_position_embeddings were that
    uid = engine.submit(images, text, max_tokens=10, logit_bias={processor.tokenizer.eos_id: -1e9})
    assert len(engine.waiting[0].request.prompt_ids) == prompt
    outputs = []
    with engine.running():
        while engine.has_work:
            outputs += [o for o in engine.step() if o.uid == uid]
    assert [o.finish_reason for o in outputs] == [None, None, "length"]


def test_padding_left_by_a_long_row_is_dropped_and_tokens_stay_exact(loaded, cases):
    """A long prompt leaves early; the short row's 256+ positions of padding are then cut from the buffers."""
    model, processor = loaded
    image = str(FIXTURES / "images" / "chelsea.jpg")
    no_eos = {processor.tokenizer.eos_id: -1e9}
    alone = Engine(model, processor, batch_size=1)
    uid = alone.submit(image, "caption en", max_tokens=10, logit_bias=no_eos)
    expected = run(alone)[0][uid]
    engine = Engine(model, processor, batch_size=2)
    engine.submit(image, "caption en " + "cat " * 300, max_tokens=2, logit_bias=no_eos)
    short = engine.submit(image, "caption en", max_tokens=10, logit_bias=no_eos)
    lengths, tokens = [], []
    with engine.running():
        while engine.has_work:
            tokens += [o.token for o in engine.step() if o.uid == short]
            if engine.batch:
                lengths.append(engine.batch.length)
    assert max(lengths) > 300 and min(lengths) < 100, "the padding was dropped"
    assert tokens == expected


def test_n_choices_share_one_prefill_and_are_each_seeds_answer(loaded, cases, monkeypatch):
    """n=4 is one request of 4 rows: its prompt goes through the decoder once (as best_of's), and choice i is what
    the same prompt answers alone with seed + i."""
    model, processor = loaded
    _, _, images, text = prompts_of(cases)[0]
    settings = dict(max_tokens=8, temperature=1.5, top_k=50)
    alone = []
    for i in range(4):
        engine = Engine(model, processor, batch_size=4)
        uid = engine.submit(images, text, seed=7 + i, **settings)
        alone.append(run(engine)[0][uid])
    prefills = []
    real = Prefill.__init__
    monkeypatch.setattr(Prefill, "__init__", lambda self, model, rows, *a, **k: prefills.append(len(rows)) or real(
        self, model, rows, *a, **k))
    engine = Engine(model, processor, batch_size=8)
    engine.submit(images, text, seed=7, n=4, **settings)
    with engine.running():
        while engine.has_work:
            results = [o.result for o in engine.step() if o.result is not None]
            if results:
                result = results[0]
    assert prefills == [4]  # one prefill, its keys and values copied to the 4 rows
    assert [s.tokens for s in result.sequences] == alone
    assert len(set(map(tuple, alone))) > 1, "the seeds must give different answers for this to mean anything"
