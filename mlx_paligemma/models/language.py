"""Gemma 1 and Gemma 2 decoders with PaliGemma's prefix-LM attention mask.

Gemma 2 differs from Gemma 1 by four norms per block instead of two, tanh soft-capping of the attention
scores and of the final logits, a query scale from `query_pre_attn_scalar`, and a sliding window on
some layers. A Gemma 1 config leaves those fields at None.
"""

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn


ATTENTION_CHUNK = 1024  # queries per attention block of a whole forward (the engine's prefill sizes its own pieces)

# Half precision (bfloat16, float16) keeps float32 where transformers does, and where float32 costs no kernel more:
# the residual stream between the layers (transformers rounds it after each of a layer's two adds; here only the
# norms' outputs, which feed the matmuls, are rounded, see RMSNorm and DecoderLayer) and the two fused spots below.
# The stream is one vector per token, so decoding, bound by reading the weights, does not slow. In float32 every
# cast here is a no-op. Left as they are: matmuls (MLX accumulates in float32 and rounds once, as PyTorch does), the
# embedding scale (rounded to the dtype in both, see embed), RoPE (cos/sin from float32 angles rounded to the dtype,
# as transformers does) and the fused attention of Gemma 1 (softmax in float32, as transformers' eager attention).


@partial(mx.compile, shapeless=True)
def gelu_times(gate: mx.array, up: mx.array) -> mx.array:
    # transformers' gelu_pytorch_tanh computes in float32 and rounds once; MLX's gelu_approx would round after
    # each of its seven steps in bfloat16. Fused with the product by up, so one kernel and one rounding.
    return (nn.gelu_approx(gate.astype(mx.float32)) * up).astype(up.dtype)


@partial(mx.compile, shapeless=True)
def soft_cap(x: mx.array, cap: float) -> mx.array:
    # cap * tanh(x / cap) in float32, one fused kernel: transformers rounds after each of the three steps. Returns
    # float32.
    return mx.tanh(x.astype(mx.float32) / cap) * cap


@dataclass
class TextConfig:
    # Defaults are transformers' GemmaConfig / Gemma2Config defaults, which old hub configs rely on.
    model_type: str = "gemma"
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    vocab_size: int = 256000
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[List[str]] = None

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"


def prefix_lm_mask(
    prefix,
    key_valid: Optional[mx.array],
    offset,
    length: int,
    window: Optional[int] = None,
) -> Optional[mx.array]:
    """The one place the attention rule lives. Returns a (B, 1, L, N) boolean mask, or None for "attend to all".

    Queries are the `length` tokens at cache positions offset..offset+L-1; keys are positions 0..N-1.
    A query attends to a key when the key is not padding and either
    - both are in the prefix (image tokens, bos, prompt, "\\n"): bidirectional, and this overrides the window, or
    - the key is not after the query (causal) and, on sliding-window layers, fewer than `window` positions back.
    `prefix` (B, L) marks the current tokens that belong to the prefix; None means all of them do, False that
    none do (decoding). Earlier (cached) keys count as prefix, since a prefix split across calls always comes first.
    `key_valid` (B, N) is False on padding; None means no padding and N = offset + L. When decoding into
    fixed-size buffers (a compiled step), `offset` is an array and key_valid spans the whole buffer: the keys
    after the query, not written yet, are excluded by the causal rule.
    """
    n_keys = key_valid.shape[1] if key_valid is not None else offset + length
    if key_valid is None:
        if prefix is None:
            return None
        if length == 1 and (window is None or n_keys <= window):
            return None
    if prefix is None:
        allowed = mx.array(True)[None, None]
    else:
        q_idx = mx.arange(length)[:, None] + offset
        k_idx = mx.arange(n_keys)[None]
        allowed = k_idx <= q_idx
        if window is not None:
            allowed = allowed & (k_idx > q_idx - window)
        allowed = allowed[None]
        if prefix is not False:
            k_prefix = mx.concatenate([mx.ones((prefix.shape[0], offset), mx.bool_), prefix], axis=1)
            allowed = allowed | (prefix[:, :, None] & k_prefix[:, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed[:, None]


class RMSNorm(nn.Module):
    # Gemma stores w and scales by (1 + w).
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # As transformers: normalised and scaled by (1 + w) in float32, rounded once, to the weights' dtype (the
        # stream x is float32, the matmuls that follow take the model's dtype). In bfloat16, 1 + w would drop w's
        # low bits, and MLX's kernel rounds the normalised x before scaling.
        return self.float32(x).astype(self.weight.dtype)

    def float32(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight.astype(mx.float32), self.eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, sliding: bool):
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = (config.query_pre_attn_scalar or head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.window = config.sliding_window if sliding else None
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)

    def project(self, x: mx.array, positions: mx.array):
        """Queries, keys and values (B, heads, L, head_dim) of these tokens, rotated to their positions."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        rope = dict(traditional=False, base=self.rope_theta, scale=1.0, offset=positions)
        return mx.fast.rope(q, self.head_dim, **rope), mx.fast.rope(k, self.head_dim, **rope), v

    def output(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array]) -> mx.array:
        """The attention of queries q over keys k and values v, through o_proj: (B, L, dim)."""
        B, _, L, _ = q.shape
        return self.o_proj(self._attend(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x: mx.array, positions: mx.array, mask: Optional[mx.array], cache: Any) -> mx.array:
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # Long prefixes (4096+ image tokens at 896 px) are attended in query blocks: every block still sees all
        # keys, so the bidirectional prefix is exact, and the score matrix stays block x keys in memory.
        L = q.shape[2]
        outs = [self.output(q[:, :, s : s + ATTENTION_CHUNK], k, v, block_mask(mask, s, ATTENTION_CHUNK))
                for s in range(0, L, ATTENTION_CHUNK)]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def _attend(self, q, k, v, mask):
        if self.softcap is None:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self._softcapped_attention(q, k, v, mask)

    def _softcapped_attention(self, q, k, v, mask):
        # The fused kernel has no tanh soft-cap, so Gemma 2 spells attention out.
        B, _, L, D = q.shape
        groups = self.n_heads // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, groups, L, D) * self.scale
        k, v = k[:, :, None], v[:, :, None]
        scores = soft_cap(q @ k.swapaxes(-1, -2), self.softcap)  # float32 from here
        if mask is not None:
            scores = mx.where(mask[:, :, None], scores, mx.finfo(scores.dtype).min)
        # Softmax in float32, the weights rounded to v's dtype: transformers' eager attention.
        weights = mx.softmax(scores, axis=-1).astype(v.dtype)
        return (weights @ v).reshape(B, self.n_heads, L, D)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_times(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, sliding: bool):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, sliding)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(dim, eps)
        # Gemma 1 calls its pre-MLP norm post_attention_layernorm; Gemma 2 uses that name for a post-norm.
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.is_gemma2 = config.is_gemma2
        if self.is_gemma2:
            self.pre_feedforward_layernorm = RMSNorm(dim, eps)
            self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x, positions, mask, cache):
        return self.finish(x, self.self_attn(self.input_layernorm(x), positions, mask, cache))

    def finish(self, x: mx.array, r: mx.array) -> mx.array:
        """The layer's output from its input x and its attention's output r: the residual adds and the MLP, token
        by token (a prefill may run it on a block of tokens at a time)."""
        if self.is_gemma2:
            # The post-norms' float32 outputs join the float32 stream unrounded (transformers rounds the norm's
            # output, then the sum).
            h = x + self.post_attention_layernorm.float32(r)
            m = self.mlp(self.pre_feedforward_layernorm(h))
            return h + self.post_feedforward_layernorm.float32(m)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, self.is_sliding(config, i)) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @staticmethod
    def is_sliding(config: TextConfig, i: int) -> bool:
        if config.sliding_window is None:
            return False
        if config.layer_types is not None:
            return config.layer_types[i] == "sliding_attention"
        return i % 2 == 0  # Gemma 2: layers 0, 2, 4, ... are local


class LanguageModel(nn.Module):
    """Gemma decoder with the embedding tied to the output head (`language_model.model.*`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)

    def embed(self, input_ids: mx.array) -> mx.array:
        h = self.model.embed_tokens(input_ids)
        # The normaliser is rounded to the activation dtype, as in the reference.
        return h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)

    def __call__(
        self,
        inputs_embeds: mx.array,
        cache: Optional[List[Any]] = None,
        attention_mask: Optional[mx.array] = None,
        prefix: Optional[mx.array] = None,
        logits_to_keep: int = 0,
    ) -> mx.array:
        """Logits for `inputs_embeds` (B, L, D) appended after what `cache` holds.

        attention_mask: (B, N) over the cached and the new tokens, 1 for real tokens, 0 for (left) padding.
        prefix: (B, L) True where a new token belongs to the bidirectional prefix; None means all do, False none.
        logits_to_keep: logits for only the last this many positions (0: all). Generation needs just the last,
        and the 257k-wide output head over the prefix costs as much as 5-8 decoder layers (and up to 4 GB at 896 px).
        """
        B, L, _ = inputs_embeds.shape
        offset = cache[0].offset if cache is not None else 0
        key_valid = None
        if attention_mask is None:
            positions = mx.array(offset + 1)  # PaliGemma numbers positions from 1
        else:
            key_valid = attention_mask.astype(mx.bool_)
            positions = real_positions(attention_mask, L)
        return self.forward(inputs_embeds, cache, positions,
                            lambda window: prefix_lm_mask(prefix, key_valid, offset, L, window), logits_to_keep)

    def forward(self, h: mx.array, cache: Optional[List[Any]], positions: mx.array,
                mask_for: Callable[[Optional[int]], Optional[mx.array]], logits_to_keep: int = 0) -> mx.array:
        """The decoder stack and the head, given the positions and the mask of each attention window."""
        h = h.astype(mx.float32)  # the residual stream (see the note at the top)
        masks = {}
        for i, layer in enumerate(self.model.layers):
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = mask_for(window)
            h = layer(h, positions, masks[window], cache[i] if cache is not None else None)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    def head(self, h: mx.array) -> mx.array:
        """Logits of the residual stream h: the final norm and the tied output head."""
        logits = self.model.embed_tokens.as_linear(self.model.norm(h))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            # Left in float32: rounding to bfloat16 would move each logit by up to half a step (0.016 at 4-8),
            # and what reads them (softmax, log-probabilities, the loss) computes in float32.
            logits = soft_cap(logits, cap)
        return logits


def real_positions(attention_mask: mx.array, length: int) -> mx.array:
    """(B, L) positions of the last `length` tokens, counting real tokens only (from 1), so a left-padded row
    matches its unpadded run."""
    return attention_mask.astype(mx.int32).sum(axis=-1) - length + 1


def block_mask(mask: Optional[mx.array], start: int, size: int) -> Optional[mx.array]:
    """The rows of a (B, 1, L, N) mask for the queries start..start+size (a mask of one query row fits all)."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., start : start + size, :]
