"""Hugging Face checkpoint (hub id or folder) -> MLX folder, optionally with a quantized decoder.

    python convert.py --hf-path google/paligemma2-3b-pt-224 --mlx-path paligemma2-3b-4bit -q
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .loading import build_model, get_model_path, load_config, load_weights, sanitize
from .processor import InputError

# Tokenizer and processor files that travel with the weights.
SIDE_FILES = [
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.json",
]
MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def quantize(model, group_size: int, bits: int, vision: bool = False) -> None:
    """Quantize the decoder's linears and tied embedding (and, if asked, the vision tower and projector),
    skipping layers whose input width the group size does not divide."""

    def predicate(name, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return vision or name.startswith("language_model.")

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def save_weights(folder: Path, weights: dict) -> None:
    shards, shard, size = [], {}, 0
    for name, w in weights.items():
        if shard and size + w.nbytes > MAX_SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = w
        size += w.nbytes
    shards.append(shard)
    index = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"[convert] writing {file} ({sum(w.nbytes for w in shard.values()) / 1e9:.2f} GB)", flush=True)
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
        index.update({name: file for name in shard})
    if len(shards) > 1:
        total = sum(w.nbytes for w in weights.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )


def write_model_folder(out: Path, weights: dict, config: dict, source: Path) -> None:
    """Weights, config.json and the source's tokenizer and processor files, written to a temporary folder beside
    `out` and renamed at the end, so a failed run leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_weights(tmp, weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(hf_path: str, mlx_path: str, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
            group_size: int = 64, quantize_vision: bool = False, upload_repo: Optional[str] = None) -> Path:
    """Writes the MLX folder at mlx_path (atomically, see write_model_folder)."""
    out = Path(mlx_path)
    if out.exists():
        raise InputError(f"output folder {out} already exists")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype}: choose from {', '.join(DTYPES)}")
    print(f"[convert] loading {hf_path}", flush=True)
    path = get_model_path(hf_path)
    config = load_config(path)
    if config.quantization:
        raise InputError(f"{hf_path} is already quantized: convert from the float checkpoint")
    weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in sanitize(load_weights(path)).items()}
    model = build_model(config, weights, path)
    raw_config = json.loads((path / "config.json").read_text())
    if quantize_bits:
        print(f"[convert] quantizing to {quantize_bits} bits, group size {group_size}", flush=True)
        quantize(model, group_size, quantize_bits, quantize_vision)
        raw_config["quantization"] = {"group_size": group_size, "bits": quantize_bits}
    raw_config["torch_dtype"] = dtype

    write_model_folder(out, dict(tree_flatten(model.parameters())), raw_config, path)
    print(f"[convert] wrote {out}", flush=True)
    if upload_repo:
        from huggingface_hub import HfApi

        print(f"[convert] uploading to {upload_repo}", flush=True)
        api = HfApi()
        api.create_repo(upload_repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=upload_repo)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a PaliGemma checkpoint to MLX, optionally quantized.")
    p.add_argument("--hf-path", required=True, help="hub id or local folder of the Hugging Face checkpoint")
    p.add_argument("--mlx-path", required=True, help="output folder (must not exist)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower and projector too")
    p.add_argument("--upload-repo", default=None, help="hub repo to upload the result to")
    args = p.parse_args(argv)
    try:
        convert(args.hf_path, args.mlx_path, args.dtype, args.q_bits if args.quantize else None,
                args.q_group_size, args.quantize_vision, args.upload_repo)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
