"""Any model this project loads -> a folder that transformers loads as it loads the hub checkpoints
(`PaliGemmaForConditionalGeneration.from_pretrained`, `AutoProcessor.from_pretrained`), for vLLM, TGI or
transformers itself.

    python -m mlx_paligemma.export --model fused_model --output paligemma-finetuned-hf [--dtype bfloat16]

A quantized model is dequantized (with a warning): the values its quantized layers compute with, in the
float dtype of its scales. Written atomically, like convert.
"""

import json
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cli import ArgumentParser, command, run_main
from .formats.atomic import atomic_folder
from .formats.hf import to_transformers
from .formats.mlx import (build_model, copy_side_files, dequantize, get_model_path, load_config, load_weights,
                          save_weights, upload)
from .errors import InputError
from .processing.processor import Tokenizer

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def export(model: str, out: str, dtype: Optional[str] = None, revision: Optional[str] = None,
           upload_repo: Optional[str] = None) -> Path:
    """Writes the transformers folder `out` from the model folder or hub id `model`, in its stored float dtype
    unless `dtype` is given."""
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype}: choose from {', '.join(DTYPES)}")
    out = Path(out)
    with atomic_folder(out) as tmp:
        source = get_model_path(model, revision)
        config = load_config(source)
        net = build_model(config, load_weights(source), source)
        if config.quantization:
            print(f"[export] warning: {model} is quantized; writing its dequantized weights", file=sys.stderr,
                  flush=True)
            dequantize(net)
        weights = dict(tree_flatten(net.parameters()))
        if dtype is not None:
            weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
        weights, hf_config = to_transformers(weights, config, Tokenizer(source))
        save_weights(tmp, weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        copy_side_files(source, tmp)
    print(f"[export] wrote {out}", flush=True)
    if upload_repo:
        upload(out, upload_repo, "export")
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Export a PaliGemma model to a transformers checkpoint folder.")
    p.add_argument("--model", required=True, help="folder or hub id of any model mlx_paligemma loads")
    p.add_argument("--output", "--out", dest="out", metavar="OUTPUT", required=True,
                   help="output folder (must not exist)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: the model's stored float dtype")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    p.add_argument("--upload-repo", default=None, help="hub repo to upload the result to")
    return p


def run(args) -> None:
    export(args.model, args.out, args.dtype, args.revision, args.upload_repo)


main = command(build_parser, run)

if __name__ == "__main__":
    run_main(main)
