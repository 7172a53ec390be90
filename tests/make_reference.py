"""Writes the test fixtures: tiny random PaliGemma 1 and 2 checkpoints and transformers' outputs on them.

    python tests/make_reference.py [--out DIR]        # default: tests/fixtures

Needs torch, transformers 5.x and sentencepiece (the tests themselves need neither torch nor transformers).
The checkpoints have the real architecture at toy sizes and are written by transformers itself, in the
hub layout; the reference outputs come from transformers in float32 with eager attention. Deterministic:
running it again writes the same weights and outputs.
"""

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from PIL import Image
from transformers import (GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                          SiglipImageProcessorPil)

HERE = Path(__file__).parent
PHOTOS = HERE.parent.parent / "shared" / "images"
IMAGE_SIZE, PATCH = 56, 14
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
TEXT = {
    # PaliGemma 1: Gemma 1 decoder, multi-query attention.
    "paligemma-tiny": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    # PaliGemma 2: Gemma 2 with a window shorter than every prompt and soft-caps small enough to bite.
    "paligemma2-tiny": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
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
MAX_NEW_TOKENS = 12
CORPUS = """a cat sitting on a sofa
a cat lying on a red blanket
a cup of coffee on a saucer on a wooden table
an astronaut in a white suit holding a helmet
a rocket launching into a blue sky with smoke
caption en
describe en
answer en what is this?
answer en which one shows a cat, first or second?
question en what is in the cup on the table?
detect cat ; dog
segment cat
ocr
the cat is orange and white, the coffee is black, the sky is blue""".splitlines()


def make_images(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copyfile(PHOTOS / name, out / name)
    y, x = np.mgrid[0:23, 0:37]
    Image.fromarray(((x * 7 + y * 11) % 256).astype(np.uint8), "L").save(out / "gray.png")
    y, x = np.mgrid[0:31, 0:50]
    rgba = np.stack([x * 5 % 256, y * 8 % 256, (x + y) * 3 % 256, np.where(x < 10, 0, (y * 9) % 256)], -1)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(out / "rgba.png")
    y, x = np.mgrid[0:17, 0:61]
    Image.fromarray(np.stack([x * 4, y * 15, (x * y) % 256], -1).astype(np.uint8), "RGB").save(out / "odd.png")


def make_tokenizer(folder: Path) -> None:
    """A sentencepiece BPE model of Gemma's kind: byte fallback, no dummy prefix, the loc and seg pieces."""
    specials = ["<mask>", "\n"] + [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=1600,
        hard_vocab_limit=False, byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=specials, num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def make_model(name: str, tokenizer_src: Path, out: Path):
    torch.manual_seed(0)
    processor = PaliGemmaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                image_seq_length=(IMAGE_SIZE // PATCH) ** 2),
        tokenizer=GemmaTokenizer.from_pretrained(str(tokenizer_src)),
    )
    tok = processor.tokenizer
    # Like the real 257216-row embedding for 257153 pieces: rows no piece maps to.
    vocab = -(-len(tok) // 64) * 64
    config = PaliGemmaConfig(
        text_config=dict(TEXT[name], vocab_size=vocab, initializer_range=0.2),
        vision_config=dict(VISION, projection_dim=TEXT[name]["hidden_size"]),
        projection_dim=TEXT[name]["hidden_size"], image_token_index=processor.image_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    model.generation_config.pad_token_id = tok.pad_token_id
    folder = out / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("vocab_file", None)  # the temporary path it was built from
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    if name == "paligemma-tiny":
        # The older hub generation: tokenizer.model beside tokenizer.json, flat preprocessor_config.json.
        shutil.copy(tokenizer_src / "tokenizer.model", folder / "tokenizer.model")
        image_settings = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        (folder / "preprocessor_config.json").write_text(json.dumps(
            dict(image_settings, image_processor_type="SiglipImageProcessor", processor_class="PaliGemmaProcessor"),
            indent=2))
        (folder / "processor_config.json").unlink()
    else:
        (folder / "tokenizer.model").unlink(missing_ok=True)  # newer converters write tokenizer.json only
    return model, processor


def reference_outputs(model, processor, images: Path) -> dict:
    arrays = {}
    for case in CASES:
        name = case["name"]
        imgs = [[Image.open(images / f) for f in row] for row in case["images"]]
        text = case["text"] if len(case["text"]) > 1 else case["text"][0]
        inputs = processor(images=imgs, text=text, suffix=case.get("suffix"), padding="longest", return_tensors="pt")
        mask = inputs["attention_mask"]
        # Positions as generate() builds them: counting real tokens, from 1.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) + 1
        with torch.no_grad():
            out = model(**inputs, position_ids=positions)
        for key in ("input_ids", "attention_mask", "token_type_ids") + (("labels",) if "suffix" in case else ()):
            arrays[f"{name}/{key}"] = inputs[key].numpy().astype(np.int32)
        arrays[f"{name}/pixel_values"] = inputs["pixel_values"].permute(0, 2, 3, 1).numpy()
        arrays[f"{name}/logits"] = out.logits.numpy()
        if "suffix" in case:
            arrays[f"{name}/loss"] = np.float32(out.loss)
        else:
            with torch.no_grad():
                generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            arrays[f"{name}/generated"] = generated[:, inputs["input_ids"].shape[1]:].numpy().astype(np.int32)
        if name == "single":
            with torch.no_grad():
                features = model.get_image_features(inputs["pixel_values"]).pooler_output
            arrays[f"{name}/image_features"] = features.numpy()
        print(f"[reference] {name}: {tuple(inputs['input_ids'].shape)}", flush=True)
    return arrays


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "fixtures"))
    out = Path(p.parse_args().out)
    make_images(out / "images")
    tokenizer_src = out / "tokenizer-src"
    make_tokenizer(tokenizer_src)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    for name in TEXT:
        model, processor = make_model(name, tokenizer_src, out)
        arrays = reference_outputs(model, processor, out / "images")
        np.savez_compressed(out / "reference" / f"{name}.npz", **arrays)
    shutil.rmtree(tokenizer_src)
    (out / "reference" / "cases.json").write_text(json.dumps(dict(
        transformers=transformers.__version__, torch=torch.__version__, max_new_tokens=MAX_NEW_TOKENS,
        note="generated: greedy new tokens; a row that ends early is padded with pad_token_id (0)",
        cases=CASES), indent=2))
    print(f"[reference] wrote {out}")


if __name__ == "__main__":
    main()
