"""Writes the test fixtures: tiny random PaliGemma 1 and 2 checkpoints and transformers' outputs on them.

    /work/venv/bin/python tests/make_reference.py [--out DIR] [--hf-converters DIR]    # default: tests/fixtures

Needs torch, transformers 5.x, sentencepiece, numpy, pillow and safetensors; the tests themselves need neither
torch nor transformers. The checkpoints have the real architecture at toy sizes; the reference outputs come from
transformers in float32 with eager attention. Deterministic: a second run writes byte-identical files.

It also writes both checkpoints in Google's big_vision layout (`big_vision/NAME.npz`, PaliGemma 1 in float32,
PaliGemma 2 in bfloat16 as numpy stores it), made by running transformers' converter backwards. With
`--hf-converters DIR` (a folder holding transformers' convert_paligemma_weights_to_hf.py and
convert_paligemma2_weights_to_hf.py from its GitHub repository, src/transformers/models/paligemma/; they are not
in the wheel) their own `slice_state_dict` is run on the .npz arrays and must give back the original weights.
"""

import argparse
import ast
import io
import json
import shutil
import tempfile
import types
import zipfile
from itertools import product
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoProcessor, GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                          PaliGemmaProcessor, SiglipImageProcessorPil)

transformers.logging.set_verbosity_error()  # PaliGemmaProcessor warns on every prompt without <image>
transformers.logging.disable_progress_bar()
HERE = Path(__file__).resolve().parent
PHOTOS = HERE / "fixtures" / "images"  # the committed photos (from the sample images, licences in examples/images)
IMAGE_SIZE, PATCH = 56, 14
SEQ = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens
SP_VOCAB = 1536  # sentencepiece pieces; <image> comes next, the embedding is padded to 1600 rows
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
TEXT = {
    # PaliGemma 1: Gemma 1 decoder with multi-query attention.
    "paligemma-tiny": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    # PaliGemma 2: Gemma 2 with a window shorter than every prompt and soft-caps small enough to bite.
    "paligemma2-tiny": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
MAX_NEW_TOKENS = 12
CASES = [
    dict(name="single", images=[["chelsea.jpg"]], text=["caption en"]),
    dict(name="gray", images=[["gray.png"]], text=["answer en what is this?"]),
    dict(name="rgba", images=[["rgba.png"]], text=["<image>ocr"]),
    dict(name="odd", images=[["odd.png"]], text=["detect cat ; dog"]),
    dict(name="two_images", images=[["chelsea.jpg", "coffee.jpg"]],
         text=["answer en which one shows a cat, first or second?"]),
    dict(name="batch", images=[["chelsea.jpg"], ["coffee.jpg"]],
         text=["caption en", "answer en what is in the cup on the table?"]),
    dict(name="suffix", images=[["chelsea.jpg"], ["coffee.jpg"]], text=["caption en", "caption en"],
         suffix=["a cat", "a cup of coffee on a saucer"]),
]

# Beam searches on the generation cases. `eos_at`: the search ends on the greedy answer's token at that position
# instead of <eos> (which a random model hardly ever says), so hypotheses finish at several lengths and the length
# penalty and the stopping rules decide.
BEAMS = [
    dict(case="single", num_beams=2),
    dict(case="single", num_beams=3, eos_at=1, length_penalty=0.0),
    dict(case="single", num_beams=3, eos_at=2, num_return_sequences=3),
    dict(case="two_images", num_beams=3, eos_at=1, length_penalty=0.5, num_return_sequences=2),
    dict(case="two_images", num_beams=5, eos_at=3, early_stopping=True, num_return_sequences=5),
    dict(case="gray", num_beams=4, eos_at=2, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
    dict(case="odd", num_beams=3, eos_at=1, length_penalty=-1.0),
    dict(case="batch", num_beams=3, eos_at=1, num_return_sequences=2),
]
TOP_LOGPROBS = 5
# Candidate answers scored given a case's image(s) and prompt: each candidate is the case's prompt with it as suffix.
SCORES = [
    dict(case="single", candidates=["a cat", "a cup of coffee on a saucer", "two cats on a sofa", "cat"]),
    dict(case="two_images", candidates=["first", "second"]),
]


def corpus() -> list[str]:
    """A few hundred lines of PaliGemma-style prompts and answers, from templates so the script stays short."""
    things = ["a cat", "a small kitten", "two cats", "a dog", "a cup of coffee", "a mug of tea", "a person",
              "an astronaut", "a rocket"]
    places = ["on a sofa", "on a wooden table", "next to a window", "in the garden", "on a saucer",
              "under a red blanket", "in the sky", "on the floor"]
    lines = [f"{t} {p}" for t, p in product(things, places)]
    lines += [f"caption en\n{t} sitting {p}" for t, p in product(things[:4], places)]
    lines += [f"answer en what is {p}?\n{t}" for t, p in product(things[::2], places)]
    lines += [f"answer en which one shows {t}, first or second?\n{a}" for t, a in product(things, ["first", "second"])]
    lines += [f"detect {a} ; {b}\n<loc{17 * i:04d}><loc{31 * i % 1024:04d}><loc0512><loc1000> {a}"
              for i, (a, b) in enumerate(product(["cat", "dog", "cup", "person", "table"], repeat=2))]
    lines += [f"segment {a}\n<seg{i:03d}><seg{(7 * i) % 128:03d}>" for i, a in enumerate(["cat", "dog", "cup"] * 4)]
    lines += [f"ocr\nthe price is {n} dollars and {n * 7 % 100} cents" for n in range(3, 300, 13)]
    lines += ["describe en", "question en what is in the cup on the table?", "the cat is orange and white",
              "the coffee is black, the saucer is white, the sky is blue", "answer en what is this?",
              "a cat lying on a blanket  with two  spaces", "Caption EN: A Cat, A Cup. (2024)"]
    return lines


def make_images(out: Path) -> None:
    """Two photos plus small synthetic images covering gray, alpha and odd aspect ratios."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        if (out / name).resolve() != (PHOTOS / name).resolve():
            shutil.copyfile(PHOTOS / name, out / name)
    y, x = np.mgrid[0:23, 0:37]
    Image.fromarray(((x * 7 + y * 11) % 256).astype(np.uint8), "L").save(out / "gray.png")
    y, x = np.mgrid[0:31, 0:50]
    alpha = np.where(x < 10, 0, (y * 9 + x * 2) % 256)  # a fully transparent band, then varying alpha
    rgba = np.stack([x * 5 % 256, y * 8 % 256, (x + y) * 3 % 256, alpha], -1)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(out / "rgba.png")
    y, x = np.mgrid[0:17, 0:61]
    Image.fromarray(np.stack([x * 4, y * 15, (x * y) % 256], -1).astype(np.uint8), "RGB").save(out / "odd.png")


def train_tokenizer() -> bytes:
    """A sentencepiece BPE model of Gemma's kind: byte fallback, no dummy prefix, digits split, loc/seg pieces."""
    # <mask> sits at id 4 as in Gemma: GemmaTokenizer would otherwise append a <mask> that tokenizer.model lacks,
    # and <image> would get a different id from tokenizer.json than from tokenizer.model.
    specials = ["<mask>"] + [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    spm.set_random_generator_seed(0)  # with one thread and no input shuffling, training is repeatable
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=SP_VOCAB,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=specials,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def make_processor(sp_model: bytes) -> PaliGemmaProcessor:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp_model)
        tokenizer = GemmaTokenizer.from_pretrained(tmp)  # converted to a tokenizers BPE here
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3, image_seq_length=SEQ)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image>


def make_model(name: str, processor: PaliGemmaProcessor) -> PaliGemmaForConditionalGeneration:
    tok = processor.tokenizer
    vocab = -(-len(tok) // 64) * 64  # padded like the real 257216 rows for 257153 pieces
    hidden = TEXT[name]["hidden_size"]
    config = PaliGemmaConfig(
        text_config=dict(TEXT[name], vocab_size=vocab, initializer_range=0.2),  # 0.2: logits far from uniform
        vision_config=dict(VISION, projection_dim=hidden), projection_dim=hidden, hidden_size=hidden,
        vocab_size=vocab, image_token_index=processor.image_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms and biases start constant; random ones catch a port that drops them
                param.add_(0.1 * torch.randn_like(param))
        # With the head tied, a large token embedding in the residual makes greedy decoding repeat one token:
        # embeddings at Gemma's usual std 0.02, and a final norm scale of about 10 so logits still span several
        # units and the final soft-cap bites.
        text_model = model.model.language_model
        text_model.embed_tokens.weight.mul_(0.1)
        text_model.norm.weight.add_(9.0)
        # Rows no piece maps to are zero, so greedy decoding never picks an id without a piece.
        text_model.embed_tokens.weight[len(tok):] = 0
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def hub_name(key: str) -> str | None:
    """The published PaliGemma 1 names for 5.24's in-memory names; the head is tied, so not stored."""
    for new, old in (("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model.")):
        if key.startswith(new):
            return old + key[len(new):]
    assert key == "lm_head.weight", key
    return None


def save_folder(name: str, model, processor, sp_model: bytes, folder: Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("vocab_file", None)  # a temporary path
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if name == "paligemma2-tiny":  # as transformers writes it, except: newer hub repos have tokenizer.json only
        (folder / "tokenizer.model").unlink(missing_ok=True)
        return
    # PaliGemma 1 as on the hub (written by transformers 4.42): hub weight names, sparse config.json,
    # tokenizer.model beside tokenizer.json, the flat preprocessor_config.json.
    tensors = {hub_name(k): v.contiguous() for k, v in model.state_dict().items() if hub_name(k)}
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    c = model.config
    text = {k: getattr(c.text_config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_hidden_layers", "num_key_value_heads", "head_dim",
                                                   "model_type", "num_image_tokens", "vocab_size")}
    vision = {k: getattr(c.vision_config, k) for k in ("hidden_size", "image_size", "intermediate_size",
                                                       "model_type", "num_attention_heads", "num_hidden_layers",
                                                       "patch_size", "projection_dim", "vision_use_head")}
    vision.update(num_image_tokens=SEQ, projector_hidden_act="gelu_fast")  # on the hub too; unused
    text.update(hidden_activation="gelu_pytorch_tanh", torch_dtype="float32")  # the old key names, as on the hub
    hub = dict(architectures=["PaliGemmaForConditionalGeneration"], bos_token_id=c.bos_token_id,
               eos_token_id=c.eos_token_id, hidden_size=c.hidden_size, ignore_index=-100,
               image_token_index=c.image_token_index, model_type="paligemma", pad_token_id=c.pad_token_id,
               projection_dim=c.projection_dim, text_config=text, torch_dtype="float32",
               transformers_version="4.42.0.dev0", vision_config=vision, vocab_size=c.text_config.vocab_size)
    (folder / "config.json").write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n")
    (folder / "tokenizer.model").write_bytes(sp_model)
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(
        do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5] * 3,
        image_processor_type="SiglipImageProcessor", image_seq_length=SEQ, image_std=[0.5] * 3,
        processor_class="PaliGemmaProcessor", resample=3, rescale_factor=1 / 255,
        size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE)), indent=2, sort_keys=True) + "\n")


def hub_weights(model) -> dict:
    return {hub_name(k): v.detach().clone() for k, v in model.state_dict().items() if hub_name(k)}


def big_vision_arrays(model, bfloat16: bool) -> dict:
    """The checkpoint as big_vision saves it: flat `params/img/...` and `params/llm/...` names, layers stacked on
    axis 0, flax kernels (in, out), Gemma's einsum weights, the vocabulary without <image> and padding rows.
    Each array is the inverse of what transformers' slice_state_dict does with it."""
    w = hub_weights(model)
    c = model.config
    heads, kv_heads, head_dim = (c.text_config.num_attention_heads, c.text_config.num_key_value_heads,
                                 c.text_config.head_dim)
    hidden, width = c.text_config.hidden_size, c.vision_config.hidden_size
    vision_heads = c.vision_config.num_attention_heads
    v, t = "vision_tower.vision_model.", "language_model.model."
    vision_layers, text_layers = range(c.vision_config.num_hidden_layers), range(c.text_config.num_hidden_layers)

    def stack(key, f=lambda x: x, layers=text_layers, prefix=t):
        return torch.stack([f(w[f"{prefix}layers.{i}.{key}"]) for i in layers])

    def vstack(key, f=lambda x: x):
        return stack(key, f, vision_layers, v + "encoder.")

    img = "img/Transformer/encoderblock/"
    mha = img + "MultiHeadDotProductAttention_0/"
    arrays = {
        "img/embedding/kernel": w[v + "embeddings.patch_embedding.weight"].permute(2, 3, 1, 0),  # OIHW -> HWIO
        "img/embedding/bias": w[v + "embeddings.patch_embedding.bias"],
        "img/pos_embedding": w[v + "embeddings.position_embedding.weight"][None],
        img + "LayerNorm_0/scale": vstack("layer_norm1.weight"), img + "LayerNorm_0/bias": vstack("layer_norm1.bias"),
        img + "LayerNorm_1/scale": vstack("layer_norm2.weight"), img + "LayerNorm_1/bias": vstack("layer_norm2.bias"),
        img + "MlpBlock_0/Dense_0/kernel": vstack("mlp.fc1.weight", lambda x: x.T),
        img + "MlpBlock_0/Dense_0/bias": vstack("mlp.fc1.bias"),
        img + "MlpBlock_0/Dense_1/kernel": vstack("mlp.fc2.weight", lambda x: x.T),
        img + "MlpBlock_0/Dense_1/bias": vstack("mlp.fc2.bias"),
        mha + "out/kernel": vstack("self_attn.out_proj.weight", lambda x: x.T.reshape(vision_heads, -1, width)),
        mha + "out/bias": vstack("self_attn.out_proj.bias"),
        "img/Transformer/encoder_norm/scale": w[v + "post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": w[v + "post_layernorm.bias"],
        "img/head/kernel": w["multi_modal_projector.linear.weight"].T,
        "img/head/bias": w["multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": w[t + "embed_tokens.weight"][:SP_VOCAB],
        "llm/layers/attn/q_einsum/w": stack("self_attn.q_proj.weight",
                                            lambda x: x.reshape(heads, head_dim, hidden).permute(0, 2, 1)),
        "llm/layers/attn/kv_einsum/w": torch.stack(
            [stack(f"self_attn.{p}_proj.weight", lambda x: x.reshape(kv_heads, head_dim, hidden).permute(0, 2, 1))
             for p in "kv"], 1),
        "llm/layers/attn/attn_vec_einsum/w": stack("self_attn.o_proj.weight",
                                                   lambda x: x.reshape(hidden, heads, head_dim).permute(1, 2, 0)),
        "llm/layers/mlp/gating_einsum": torch.stack([stack(f"mlp.{p}_proj.weight", lambda x: x.T)
                                                     for p in ("gate", "up")], 1),
        "llm/layers/mlp/linear": stack("mlp.down_proj.weight", lambda x: x.T),
        "llm/layers/pre_attention_norm/scale": stack("input_layernorm.weight"),
        "llm/final_norm/scale": w[t + "norm.weight"],
    }
    for p in ("query", "key", "value"):
        proj = f"self_attn.{p[0]}_proj"
        arrays[f"{mha}{p}/kernel"] = vstack(proj + ".weight", lambda x: x.T.reshape(width, vision_heads, -1))
        arrays[f"{mha}{p}/bias"] = vstack(proj + ".bias", lambda x: x.reshape(vision_heads, -1))
    if c.text_config.model_type == "gemma2":
        arrays.update({"llm/layers/post_attention_norm/scale": stack("post_attention_layernorm.weight"),
                       "llm/layers/pre_ffw_norm/scale": stack("pre_feedforward_layernorm.weight"),
                       "llm/layers/post_ffw_norm/scale": stack("post_feedforward_layernorm.weight")})
    else:  # Gemma 1 names its one pre-MLP norm pre_ffw_norm
        arrays["llm/layers/pre_ffw_norm/scale"] = stack("post_attention_layernorm.weight")
    if bfloat16:  # numpy has no bfloat16: big_vision's files hold the 2-byte patterns as void
        return {"params/" + k: a.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")
                for k, a in arrays.items()}
    return {"params/" + k: a.contiguous().numpy() for k, a in arrays.items()}


def check_big_vision(arrays: dict, model, converters: Path) -> None:
    """transformers' own slice_state_dict (taken from its converter script, without the script's JAX and CUDA
    set-up) turns the .npz arrays back into the model's weights, bit for bit."""
    script = "convert_paligemma2_weights_to_hf.py" if model.config.text_config.model_type == "gemma2" else \
        "convert_paligemma_weights_to_hf.py"
    tree = ast.parse((converters / script).read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "slice_state_dict")
    scope = {"torch": torch, "np": np, "jnp": types.SimpleNamespace(bfloat16="bfloat16 (never a numpy dtype)")}
    exec(compile(ast.Module([function], []), script, "exec"), scope)

    def widen(a):  # bfloat16 patterns -> the same values in float32, which the converter takes as they are
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if a.dtype.kind == "V" else a

    state = scope["slice_state_dict"]({k[len("params/"):]: widen(a) for k, a in arrays.items()}, model.config)
    bf16 = next(iter(arrays.values())).dtype.kind == "V"
    expected = {k: v.to(torch.bfloat16).float() if bf16 else v for k, v in hub_weights(model).items()}
    embedding = "language_model.model.embed_tokens.weight"
    expected[embedding] = expected[embedding][:SP_VOCAB]
    assert torch.equal(state.pop("language_model.lm_head.weight"), state["language_model.model.embed_tokens.weight"])
    assert sorted(state) == sorted(expected), set(state) ^ set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key].float(), value), key
    print(f"[big_vision] transformers' {script} gives back every weight ({len(state)})", flush=True)


def prepare(processor, case: dict, images: Path):
    imgs = [[Image.open(images / f) for f in row] for row in case["images"]]
    return processor(images=imgs, text=case["text"], suffix=case.get("suffix"), padding="longest",
                     return_tensors="pt")


@torch.no_grad()
def reference_outputs(model, processor, images: Path) -> dict:
    arrays = {}
    for case in CASES:
        name, inputs = case["name"], prepare(processor, case, images)
        mask = inputs["attention_mask"]
        # Positions exactly as generate() (5.24) builds them: count real tokens, pads 0 (generation/utils.py
        # _prepare_position_ids_for_generation), then +1 as PaliGemma numbers them from 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + 1
        out = model(**inputs, position_ids=positions)
        keys = ["input_ids", "attention_mask", "token_type_ids"] + (["labels"] if "suffix" in case else [])
        for key in keys:
            arrays[f"{name}/{key}"] = inputs[key].numpy().astype(np.int32)
        arrays[f"{name}/pixel_values"] = inputs["pixel_values"].permute(0, 2, 3, 1).contiguous().numpy()
        arrays[f"{name}/logits"] = out.logits.numpy()
        if "suffix" in case:
            arrays[f"{name}/loss"] = out.loss.numpy()
        else:
            gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
            # generate's prefill saw the same positions and masks as our forward pass:
            torch.testing.assert_close(gen.logits[0], out.logits[:, -1], rtol=1e-5, atol=1e-5)
            arrays[f"{name}/generated"] = gen.sequences[:, mask.shape[1]:].numpy().astype(np.int32)
            # Each generated token's log-probability, and the most likely alternatives, from the same logits.
            logprobs = torch.log_softmax(torch.stack(gen.logits, 1).float(), -1)
            top = logprobs.topk(TOP_LOGPROBS, dim=-1)
            chosen = logprobs.gather(-1, gen.sequences[:, mask.shape[1]:, None])[..., 0]
            arrays[f"{name}/token_logprobs"] = chosen.numpy()
            arrays[f"{name}/top_logprobs"] = top.values.numpy()
            arrays[f"{name}/top_ids"] = top.indices.numpy().astype(np.int32)
        if name == "single":
            arrays[f"{name}/image_features"] = model.get_image_features(inputs["pixel_values"]).pooler_output.numpy()
        generated = arrays[f"{name}/generated"].tolist() if "suffix" not in case else "-"
        print(f"[reference]   {name}: input_ids {tuple(mask.shape)}, generated {generated}", flush=True)
    return arrays


@torch.no_grad()
def beam_outputs(model, processor, images: Path, arrays: dict) -> dict:
    """transformers' beam search (generate(num_beams=...)) on the generation cases: sequences (generated part, rows
    ended early filled with the eos id, as generate fills them) and sequences_scores."""
    out = {}
    cases = {c["name"]: c for c in CASES}
    for i, beam in enumerate(BEAMS):
        inputs = prepare(processor, cases[beam["case"]], images)
        eos = (int(arrays[f"{beam['case']}/generated"][0, beam["eos_at"]]) if "eos_at" in beam
               else processor.tokenizer.eos_token_id)
        settings = {k: v for k, v in beam.items() if k not in ("case", "eos_at")}
        gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
                             return_dict_in_generate=True, output_scores=True, **settings)
        out[f"beam{i}/sequences"] = gen.sequences[:, inputs["input_ids"].shape[1]:].numpy().astype(np.int32)
        out[f"beam{i}/scores"] = gen.sequences_scores.numpy()
        out[f"beam{i}/eos"] = np.array(eos, np.int32)
        print(f"[reference]   beam{i} {beam}: {out[f'beam{i}/sequences'].tolist()}", flush=True)
    for i, item in enumerate(SCORES):
        case = cases[item["case"]]
        rows, labels = [], []
        for candidate in item["candidates"]:
            inputs = prepare(processor, dict(case, suffix=[candidate]), images)
            logprobs = torch.log_softmax(model(**inputs).logits.float(), -1)[0, :-1]
            target = inputs["labels"][0, 1:]
            keep = target != -100  # the suffix and its <eos>
            rows.append(logprobs[keep].gather(-1, target[keep][:, None])[:, 0].numpy())
            labels.append(target[keep].numpy())
        width = max(len(r) for r in rows)
        out[f"score{i}/token_logprobs"] = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
        out[f"score{i}/labels"] = np.stack([np.pad(t, (0, width - len(t)), constant_values=-1) for t in labels]
                                           ).astype(np.int32)
        print(f"[reference]   score{i}: {[float(r.sum()) for r in rows]}", flush=True)
    return out


def save_npz(path: Path, arrays: dict, compression: int = zipfile.ZIP_DEFLATED) -> None:
    """np.savez_compressed stamps each member with the current time; fixed timestamps keep the bytes stable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


@torch.no_grad()
def check_reload(folder: Path, processor, arrays: dict, images: Path) -> None:
    """The saved folder, read back by transformers, must be the model and processor the references came from."""
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    reloaded = AutoProcessor.from_pretrained(folder)
    for case in CASES:
        ours, theirs = prepare(processor, case, images), prepare(reloaded, case, images)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (folder.name, case["name"], key)
    inputs = prepare(reloaded, CASES[0], images)
    logits = model(**inputs).logits.numpy()
    assert np.array_equal(logits, arrays["single/logits"]), np.abs(logits - arrays["single/logits"]).max()
    print(f"[reload] {folder.name}: {type(reloaded.image_processor).__name__}, same inputs, same 'single' logits")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "fixtures"), help="output folder (default: tests/fixtures)")
    p.add_argument("--hf-converters", type=Path, default=None,
                   help="folder with transformers' two PaliGemma converter scripts, to check the .npz files with")
    args = p.parse_args()
    out = Path(args.out)
    print(f"[images] {out / 'images'}", flush=True)
    make_images(out / "images")
    sp_model = train_tokenizer()
    (out / "reference").mkdir(parents=True, exist_ok=True)
    for name in TEXT:
        # A fresh processor each time: a padded call leaves its padding settings in the saved tokenizer.json.
        processor = make_processor(sp_model)
        print(f"[model] {name}: {SP_VOCAB} pieces + <image> = {len(processor.tokenizer)} tokens, "
              f"<image> id {processor.image_token_id}", flush=True)
        model = make_model(name, processor)
        save_folder(name, model, processor, sp_model, out / name)
        arrays = big_vision_arrays(model, bfloat16=name == "paligemma2-tiny")
        if args.hf_converters:
            check_big_vision(arrays, model, args.hf_converters)
        else:
            print("[big_vision] not checked: give --hf-converters DIR to run transformers' converter on it", flush=True)
        save_npz(out / "big_vision" / f"{name}.npz", arrays, zipfile.ZIP_STORED)  # big_vision saves uncompressed
        arrays = reference_outputs(model, processor, out / "images")
        arrays.update(beam_outputs(model, processor, out / "images", arrays))
        save_npz(out / "reference" / f"{name}.npz", arrays)
        check_reload(out / name, processor, arrays, out / "images")
    cases = [dict(case, suffix=case.get("suffix"), max_new_tokens=None if "suffix" in case else MAX_NEW_TOKENS,
                  arrays=sorted(k.split("/")[1] for k in arrays if k.startswith(case["name"] + "/")))
             for case in CASES]
    beams = [dict(beam, arrays=f"beam{i}/sequences, beam{i}/scores, beam{i}/eos") for i, beam in enumerate(BEAMS)]
    scores = [dict(item, arrays=f"score{i}/token_logprobs, score{i}/labels") for i, item in enumerate(SCORES)]
    notes = {
        "pixel_values": "N,H,W,3 float32 (channels last), N = all images of the batch in order",
        "positions": "forward passes used position_ids = (cumsum(attention_mask)-1).masked_fill(mask==0, 0) + 1, "
                     "as generate() builds them; logits at pad positions are meaningless",
        "generated": "greedy new tokens only (B, T), T <= max_new_tokens: generate stops once every row has "
                     "produced eos, and a row that ended earlier gets pad_token_id (0) after its eos",
        "image_features": "single/image_features: get_image_features(pixel_values).pooler_output, after the projector",
        "token_logprobs": "log_softmax (float32) of generate's output_logits at each generated token; top_logprobs, "
                          f"top_ids: the {TOP_LOGPROBS} most likely ids of each step and their log-probabilities",
        "beams": "generate(num_beams=..., max_new_tokens=12, do_sample=False, eos_token_id=eos, ...): sequences are "
                 "the generated part (R = num_return_sequences per prompt, rows filled with eos after theirs end), "
                 "scores its sequences_scores; eos is the greedy token at eos_at (or <eos>)",
        "scores": "per candidate (the case's prompt with the candidate as suffix), log_softmax of the forward "
                  "logits at each label position (the suffix tokens and <eos>), padded with 0 / -1",
    }
    (out / "reference" / "cases.json").write_text(json.dumps(dict(
        transformers=transformers.__version__, torch=torch.__version__, notes=notes, cases=cases, beams=beams,
        scores=scores), indent=2) + "\n")
    print(f"[done] wrote {out}")


if __name__ == "__main__":
    main()
