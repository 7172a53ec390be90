"""SigLIP vision encoder (So400m/14 in every PaliGemma): patches -> encoder -> post LayerNorm.

PaliGemma uses the last hidden state of every patch: no pooling head, no CLS token.

In half precision (bfloat16, float16) the residual stream between the layers is kept in float32, and only the
LayerNorms' outputs, which feed the matmuls, are rounded to the weights' dtype. transformers rounds the stream after
every add (54 in So400m/14), and at a magnitude of a few units each rounding costs more than a matmul's: with the
two fixes below, this halves the features' error (docs/SPEED.md). The tower runs once per image, so it costs no
decoding time. In float32 every cast here is a no-op.
"""

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionConfig:
    # Defaults are transformers' SiglipVisionConfig defaults, which old hub configs rely on.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    # torch's tanh GELU computes in float32 and rounds once; MLX's gelu_approx in bfloat16 rounds at every step.
    return nn.gelu_approx(x.astype(mx.float32)).astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    def __call__(self, x: mx.array) -> mx.array:
        # torch's LayerNorm on half-precision input normalises and applies weight and bias in float32, rounding
        # once; MLX's kernel rounds the normalised x to the input's dtype before scaling. The float32 stream (x)
        # is rounded here, once, to the weights' dtype for the matmuls that follow.
        f32 = mx.float32
        return mx.fast.layer_norm(x, self.weight.astype(f32), self.bias.astype(f32), self.eps).astype(self.weight.dtype)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) pixels -> (N, patches, D) in float32, the residual stream's dtype."""
        conv = self.patch_embedding
        # (N, H/p, W/p, D), row-major patches as in PyTorch. The bias and the position embedding are added in
        # float32: nn.Conv2d would round the convolution, then the bias; torch rounds the biased convolution and
        # then the sum with the positions.
        x = mx.conv2d(pixel_values, conv.weight, stride=conv.stride).astype(mx.float32) + conv.bias
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # On the CPU, MLX's attention multiplies q by the scale rounded to q's dtype, and 72 ** -0.5 in bfloat16 is
        # 0.15% small: every score shrunk alike, layer after layer. Scaled here in float32 instead (transformers
        # multiplies the scores by the exact float), q rounded once; Metal's fused kernel, which scales in
        # float32, then sees a scale of 1 and that one rounding of q.
        q = (q.astype(mx.float32) * self.scale).astype(q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) pixels in [-1, 1] -> (N, num_patches, hidden) features."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class VisionTower(nn.Module):
    """Wrapper so parameter names match the checkpoints: `vision_tower.vision_model.*`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = VisionModel(config)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.vision_model(pixel_values)
