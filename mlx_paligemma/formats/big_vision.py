"""Google's big_vision PaliGemma checkpoints (`pt_3b_224.bf16.npz`, Kaggle, the hub's `-jax` repos, colab
fine-tunes) -> our weight names, with numpy only.

The mapping is the one transformers' convert_paligemma_weights_to_hf.py and convert_paligemma2_weights_to_hf.py
apply: flax kernels (in, out) transposed, layer-stacked arrays sliced, the einsum weights of Gemma's attention
and MLP reshaped into the q/k/v/o and gate/up/down linears, SigLIP's attention kernels (W, heads, head_dim)
flattened, the embedding grown by the `<image>` row and padded to a multiple of 64. transformers draws those new
rows at random around the mean embedding; we write the mean itself, so the conversion is reproducible (the rows
only ever give logits for ids no text produces). Arrays stored uncompressed are memory-mapped and read one
layer at a time, so a 28B checkpoint is never held twice.
"""

import math
import struct
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Tuple

import mlx.core as mx
import numpy as np

from ..models.paligemma import ModelConfig
from ..errors import InputError, cause
from ..processing.processor import Tokenizer

IMG, LLM = "img/Transformer/encoderblock/", "llm/layers/"


class Checkpoint:
    """The arrays of a big_vision .npz by their flat names (`img/...`, `llm/...`, the `params/` prefix dropped),
    read on access: memory-mapped where stored uncompressed (as big_vision saves them), else decompressed.
    bfloat16 arrays, which numpy stores as 2-byte void, come back as uint16 bit patterns (see `to_mx`)."""

    def __init__(self, file):
        self.file = Path(file)
        self.members = {}  # name -> (zip member, shape, dtype, fortran order, data offset if stored)
        try:
            with zipfile.ZipFile(self.file) as zf, open(self.file, "rb") as raw:
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    name = info.filename[: -len(".npy")].removeprefix("params/")
                    if info.compress_type == zipfile.ZIP_STORED:
                        raw.seek(info.header_offset + 26)
                        name_len, extra_len = struct.unpack("<HH", raw.read(4))
                        raw.seek(info.header_offset + 30 + name_len + extra_len)
                        header = _read_header(raw)
                        self.members[name] = (info, *header, raw.tell())
                    else:
                        with zf.open(info) as f:
                            self.members[name] = (info, *_read_header(f), None)
        except (OSError, zipfile.BadZipFile, ValueError, struct.error) as e:
            raise InputError(f"{self.file} is not a readable .npz checkpoint: {cause(e)}") from None
        if not any(k.startswith("llm/") for k in self.members) or not any(k.startswith("img/") for k in self.members):
            raise InputError(f"{self.file} is not a big_vision PaliGemma checkpoint: no img/ and llm/ arrays")

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def shape(self, name: str) -> tuple:
        return self._member(name)[1]

    def __getitem__(self, name: str) -> np.ndarray:
        info, shape, dtype, fortran, offset = self._member(name)
        if offset is not None:
            array = np.memmap(self.file, dtype=dtype, mode="r", offset=offset, shape=shape,
                              order="F" if fortran else "C")
        else:
            with zipfile.ZipFile(self.file) as zf, zf.open(info) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
        return array.view(np.uint16) if dtype.kind == "V" and dtype.itemsize == 2 else array

    def _member(self, name: str):
        if name not in self.members:
            raise InputError(f"{self.file} has no array {name}: not a PaliGemma checkpoint of a known layout")
        return self.members[name]

    @property
    def bfloat16(self) -> bool:
        return self._member("llm/embedder/input_embedding")[2].kind == "V"


def _read_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, dtype, fortran


def to_mx(array: np.ndarray, bfloat16: bool) -> mx.array:
    # A copy into MLX's memory of one (sliced) array; bfloat16 bit patterns are reinterpreted, not converted.
    out = mx.array(np.ascontiguousarray(array))
    return out.view(mx.bfloat16) if bfloat16 else out


def infer_config(ckpt: Checkpoint, tokenizer: Tokenizer) -> dict:
    """A transformers-style config.json from the array shapes and each family's published settings (what the
    weights do not hold: Gemma 2's soft-caps, sliding window and query scale); token ids from the tokenizer."""
    patch, _, channels, width = ckpt.shape("img/embedding/kernel")
    n_patches = ckpt.shape("img/pos_embedding")[1]
    vision_layers, _, vision_mlp = ckpt.shape(IMG + "MlpBlock_0/Dense_0/kernel")
    vision_heads = ckpt.shape(IMG + "MultiHeadDotProductAttention_0/query/kernel")[2]
    if f"{LLM}attn/qkv_einsum/w" in ckpt:
        layers, _, heads, hidden, head_dim = ckpt.shape(f"{LLM}attn/qkv_einsum/w")
        kv_heads = heads
    else:
        layers, heads, hidden, head_dim = ckpt.shape(f"{LLM}attn/q_einsum/w")
        kv_heads = ckpt.shape(f"{LLM}attn/kv_einsum/w")[2]
    mlp = ckpt.shape(f"{LLM}mlp/linear")[1]
    pieces = ckpt.shape("llm/embedder/input_embedding")[0]
    gemma2 = f"{LLM}post_attention_norm/scale" in ckpt
    if tokenizer.image_id != pieces:
        raise InputError(f"the tokenizer's <image> id is {tokenizer.image_id}, but {ckpt.file} has {pieces} "
                         "vocabulary rows: <image> must come right after them")
    text = dict(model_type="gemma2" if gemma2 else "gemma", hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, vocab_size=-(-(pieces + 2) // 64) * 64, hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=1e-6, max_position_embeddings=8192)
    if gemma2:
        # Gemma 2 27B (head_dim 128) scales queries by hidden / heads, the 2B and 9B by head_dim.
        text.update(query_pre_attn_scalar=hidden // heads if head_dim == 128 else head_dim, sliding_window=4096,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    vision = dict(model_type="siglip_vision_model", hidden_size=width, intermediate_size=vision_mlp,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads, num_channels=channels,
                  image_size=math.isqrt(n_patches) * patch, patch_size=patch, layer_norm_eps=1e-6,
                  num_image_tokens=n_patches, projection_dim=hidden, hidden_act="gelu_pytorch_tanh",
                  vision_use_head=False)
    return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                image_token_index=pieces, hidden_size=hidden, projection_dim=hidden, vocab_size=text["vocab_size"],
                text_config=text, vision_config=vision)


def weights(ckpt: Checkpoint, config: ModelConfig) -> Iterator[Tuple[str, mx.array]]:
    """(our name, array) pairs, one array read at a time."""
    bf16 = ckpt.bfloat16

    def get(name, index=()):
        return to_mx(ckpt[name][index], bf16)

    width = config.vision_config.hidden_size
    v = "vision_tower.vision_model."
    yield v + "embeddings.patch_embedding.weight", get("img/embedding/kernel").transpose(3, 0, 1, 2)  # HWIO->OHWI
    yield v + "embeddings.patch_embedding.bias", get("img/embedding/bias")
    yield v + "embeddings.position_embedding.weight", get("img/pos_embedding").reshape(-1, width)
    attention = IMG + "MultiHeadDotProductAttention_0/"
    for i in range(config.vision_config.num_hidden_layers):
        p = f"{v}encoder.layers.{i}."
        for ours, theirs in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            yield p + ours + ".weight", get(f"{IMG}{theirs}/scale", i)
            yield p + ours + ".bias", get(f"{IMG}{theirs}/bias", i)
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            yield p + f"mlp.{ours}.weight", get(f"{IMG}MlpBlock_0/{theirs}/kernel", i).T
            yield p + f"mlp.{ours}.bias", get(f"{IMG}MlpBlock_0/{theirs}/bias", i)
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            yield p + f"self_attn.{ours}.weight", get(f"{attention}{theirs}/kernel", i).reshape(width, -1).T
            yield p + f"self_attn.{ours}.bias", get(f"{attention}{theirs}/bias", i).reshape(-1)
        yield p + "self_attn.out_proj.weight", get(f"{attention}out/kernel", i).reshape(-1, width).T
        yield p + "self_attn.out_proj.bias", get(f"{attention}out/bias", i)
    yield v + "post_layernorm.weight", get("img/Transformer/encoder_norm/scale")
    yield v + "post_layernorm.bias", get("img/Transformer/encoder_norm/bias")
    yield "multi_modal_projector.linear.weight", get("img/head/kernel").T
    yield "multi_modal_projector.linear.bias", get("img/head/bias")

    text = config.text_config
    embedding = get("llm/embedder/input_embedding")
    extra = text.vocab_size - embedding.shape[0]
    if extra < 0:
        raise InputError(f"{ckpt.file} has {embedding.shape[0]} vocabulary rows, more than the config's "
                         f"vocab_size {text.vocab_size}")
    mean = embedding.astype(mx.float32).mean(axis=0).astype(embedding.dtype)
    t = "language_model.model."
    yield t + "embed_tokens.weight", mx.concatenate([embedding, mx.broadcast_to(mean, (extra, text.hidden_size))])
    norms = [("input_layernorm", "pre_attention_norm")]
    if text.is_gemma2:
        norms += [("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "pre_ffw_norm"),
                  ("post_feedforward_layernorm", "post_ffw_norm")]
    else:
        norms += [("post_attention_layernorm", "pre_ffw_norm")]  # Gemma 1's one pre-MLP norm
    fused_qkv = f"{LLM}attn/qkv_einsum/w" in ckpt
    for i in range(text.num_hidden_layers):
        p = f"{t}layers.{i}."

        def heads(w):  # (heads, hidden, head_dim) einsum weight -> (heads * head_dim, hidden) linear weight
            return w.transpose(0, 2, 1).reshape(-1, text.hidden_size)

        if fused_qkv:
            q, k, val = (heads(get(f"{LLM}attn/qkv_einsum/w", (i, j))) for j in range(3))
        else:
            q = heads(get(f"{LLM}attn/q_einsum/w", i))
            k, val = (heads(get(f"{LLM}attn/kv_einsum/w", (i, j))) for j in range(2))
        yield p + "self_attn.q_proj.weight", q
        yield p + "self_attn.k_proj.weight", k
        yield p + "self_attn.v_proj.weight", val
        # (heads, head_dim, hidden) -> (hidden, heads * head_dim)
        yield p + "self_attn.o_proj.weight", get(f"{LLM}attn/attn_vec_einsum/w", i).transpose(2, 0, 1).reshape(
            text.hidden_size, -1)
        yield p + "mlp.gate_proj.weight", get(f"{LLM}mlp/gating_einsum", (i, 0)).T
        yield p + "mlp.up_proj.weight", get(f"{LLM}mlp/gating_einsum", (i, 1)).T
        yield p + "mlp.down_proj.weight", get(f"{LLM}mlp/linear", i).T
        for ours, theirs in norms:
            yield p + f"{ours}.weight", get(f"{LLM}{theirs}/scale", i)
    yield t + "norm.weight", get("llm/final_norm/scale")


def load(file, tokenizer: Tokenizer, config: dict = None) -> Tuple[dict, Dict[str, mx.array]]:
    """(config.json dict, weights by our names) of a big_vision checkpoint; `config` (a transformers-style
    config.json) instead of the one inferred from the shapes."""
    from .mlx import parse_config

    ckpt = Checkpoint(file)
    config = config or infer_config(ckpt, tokenizer)
    return config, dict(weights(ckpt, parse_config(config, file)))


def processor_settings(settings: dict, config: ModelConfig) -> dict:
    """A processor or image processor config with the image size and token count of `config`'s model."""
    size = config.vision_config.image_size
    settings = dict(settings)
    if "image_processor" in settings:  # processor_config.json nests the image processor
        settings["image_processor"] = processor_settings(settings["image_processor"], config)
        return settings
    settings.update(size={"height": size, "width": size}, image_seq_length=config.vision_config.num_patches)
    return settings
