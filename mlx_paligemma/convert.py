"""A checkpoint (Hugging Face hub id or folder, or a big_vision .npz) -> MLX folder, optionally quantized.

    python -m mlx_paligemma.convert --model google/paligemma2-3b-pt-224 --output paligemma2-3b-4bit -q
    python -m mlx_paligemma.convert --model pt_3b_224.bf16.npz --tokenizer google/paligemma-3b-pt-224 --output pg-3b-224

`--hf-path` and `--mlx-path` (mlx-lm's names) are the same as `--model` and `--output`.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cli import ArgumentParser, command, run_main
from .formats import big_vision
from .formats.atomic import atomic_folder
from .formats.mlx import (AFFINE_BITS, MODES, build_model, check_quantization, get_model_path, load_weights,
                          parse_config, quantize, read_config, upload, write_folder)
from .errors import InputError, read_json_object
from .processing.processor import Tokenizer

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def convert(hf_path: str, mlx_path: str, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
            group_size: Optional[int] = None, quantize_vision: bool = False, upload_repo: Optional[str] = None,
            q_mode: str = "affine", quant_predicate: Optional[str] = None, revision: Optional[str] = None,
            tokenizer: Optional[str] = None, config: Optional[str] = None) -> Path:
    """Writes the MLX folder at mlx_path, atomically: to `.NAME.partial-PID` beside it, renamed at the end.

    With `quantize_bits`, the decoder is quantized (the vision tower and projector too with `quantize_vision`):
    affine with 2-6 or 8 bits and `group_size` 32/64/128 (64), or `q_mode` mxfp4, nvfp4, mxfp8 (their fixed bits
    and group size), optionally with one of mlx-lm's `quant_predicate` recipes (mixed_2_6, mixed_3_4, mixed_3_6,
    mixed_4_6; affine). A big_vision .npz needs `tokenizer` (a folder or hub id with the tokenizer and
    processor files) and takes its config from the array shapes, or from `config` (a config.json)."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype}: choose from {', '.join(DTYPES)}")
    if quantize_bits:
        check_quantization(quantize_bits, group_size, q_mode, quant_predicate)
    npz = str(hf_path).endswith(".npz")
    if npz and tokenizer is None:
        raise InputError(f"{hf_path} is a big_vision checkpoint: give --tokenizer (a folder or hub id with the "
                         "tokenizer and processor files, e.g. google/paligemma-3b-pt-224)")
    if not npz and (tokenizer or config):
        raise InputError("--tokenizer and --config are for big_vision .npz checkpoints")
    if npz and not Path(hf_path).is_file():
        raise InputError(f"checkpoint not found: {hf_path}")
    out = Path(mlx_path)
    with atomic_folder(out) as tmp:  # made first: an output that cannot be written fails before loading
        print(f"[convert] loading {hf_path}", flush=True)
        if npz:
            source = get_model_path(tokenizer, revision)
            raw_config, weights = big_vision.load(hf_path, Tokenizer(source), config and read_json_object(Path(config)))
        else:
            source = get_model_path(hf_path, revision)
            raw_config, weights = read_config(source), load_weights(source)
        where = hf_path if npz else source / "config.json"
        model_config = parse_config(raw_config, where)
        if model_config.quantization:
            raise InputError(f"{hf_path} is already quantized: convert from the float checkpoint")
        weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
        model = build_model(model_config, weights, hf_path)
        if quantize_bits:
            block = quantize(model, group_size, quantize_bits, quantize_vision, q_mode, quant_predicate)
            print(f"[convert] quantized the {'model' if quantize_vision else 'decoder'}: {block['bits']} bits, "
                  f"groups of {block['group_size']}, {q_mode} {quant_predicate or ''}", flush=True)
            raw_config["quantization"] = block
        raw_config["torch_dtype"] = dtype
        write_folder(tmp, dict(tree_flatten(model.parameters())), raw_config, source)
        if npz:  # the tokenizer folder's processor files, sized for this model
            for name in ("processor_config.json", "preprocessor_config.json"):
                if (tmp / name).is_file():
                    settings = big_vision.processor_settings(read_json_object(tmp / name), model_config)
                    (tmp / name).write_text(json.dumps(settings, indent=2))
    print(f"[convert] wrote {out}", flush=True)
    if upload_repo:
        upload(out, upload_repo, "convert")
    return out


def build_parser() -> ArgumentParser:
    from mlx_lm.convert import QUANT_RECIPES

    p = ArgumentParser(description="Convert a PaliGemma checkpoint (Hugging Face or big_vision .npz) to "
                                            "MLX, optionally quantized.")
    p.add_argument("--model", "--hf-path", dest="hf_path", metavar="MODEL", required=True,
                   help="hub id or folder of a Hugging Face checkpoint, or a big_vision .npz")
    p.add_argument("--output", "--mlx-path", dest="mlx_path", metavar="OUTPUT", required=True,
                   help="output folder (must not exist)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (or --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="for a .npz: folder or hub id with the tokenizer and "
                                                     "processor files")
    p.add_argument("--config", default=None, help="for a .npz: a config.json to use instead of the one inferred "
                                                  "from the array shapes")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="float dtype of the weights written")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder")
    p.add_argument("--q-bits", type=int, choices=AFFINE_BITS, default=None, help="affine bits (default 4)")
    p.add_argument("--q-group-size", type=int, choices=[16, 32, 64, 128], default=None,
                   help="affine group size (default 64)")
    p.add_argument("--q-mode", choices=list(MODES), default="affine",
                   help="affine, or the float formats mxfp4 (4 bits, groups of 32), nvfp4 (4, 16), mxfp8 (8, 32); "
                        "default: affine")
    p.add_argument("--quant-predicate", choices=QUANT_RECIPES, default=None,
                   help="mlx-lm's mixed-precision recipe for the decoder (with -q)")
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower and projector too")
    p.add_argument("--upload-repo", default=None, help="hub repo to upload the result to")
    return p


def run(args) -> None:
    if not args.quantize and (args.q_bits or args.q_group_size or args.q_mode != "affine" or args.quant_predicate):
        raise InputError("--q-bits, --q-group-size, --q-mode and --quant-predicate need -q (see --help)")
    bits = (args.q_bits or (MODES[args.q_mode] or (64, 4))[1]) if args.quantize else None
    convert(args.hf_path, args.mlx_path, args.dtype, bits, args.q_group_size, args.quantize_vision,
            args.upload_repo, args.q_mode, args.quant_predicate, args.revision, args.tokenizer, args.config)


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
