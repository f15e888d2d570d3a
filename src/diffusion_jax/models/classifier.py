"""The noisy classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

The UNet's downsampling half and middle block (unet.DownBlock, unet.MidBlock, the same
timestep embedding and parameter names as the UNet's encoder), then GroupNorm, swish and a
pooled head giving logits (B, num_classes): "attention" pools with one attention query (CLIP's
attention pooling, the paper's choice), "mean" averages over positions and applies a dense layer.
It knows nothing about diffusion: t is whatever the denoiser sees.
"""

import dataclasses
import types
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    NORM_EPS,
    TimestepEmbedding,
    dense,
    layer_kinds,
    timestep_embedding,
    zero_init,
)
from diffusion_jax.models.unet import DTYPES, UNet, check_unet_fields, encode


class MeanPool(nn.Module):
    """Mean over positions, then a dense layer to num_classes logits (zero-initialised: the
    untrained classifier is uniform)."""

    num_classes: int
    num_heads: int
    dtype: Any
    kernels: str

    @nn.compact
    def __call__(self, h):
        kinds = layer_kinds(self.kernels, self.dtype)
        return dense(kinds, self.num_classes, self.dtype, "out", zero_init)(h.mean(axis=(1, 2)))


class AttentionPool(nn.Module):
    """Attention pooling (CLIP; guided-diffusion's AttentionPool2d): the mean of the positions
    is prepended as a token, a learned positional embedding is added, and that token's
    multi-head attention over all tokens, projected to num_classes, gives the logits."""

    num_classes: int
    num_heads: int
    dtype: Any
    kernels: str

    @nn.compact
    def __call__(self, h):
        kinds = layer_kinds(self.kernels, self.dtype)
        b, height, width, c = h.shape
        tokens = h.reshape(b, height * width, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        position = self.param(
            "positional_embedding", nn.initializers.normal(c**-0.5), (height * width + 1, c)
        )
        tokens = tokens + position.astype(tokens.dtype)
        heads = (b, -1, self.num_heads, c // self.num_heads)
        q = dense(kinds, c, self.dtype, "to_q")(tokens[:, :1]).reshape(heads)
        k = dense(kinds, c, self.dtype, "to_k")(tokens).reshape(heads)
        v = dense(kinds, c, self.dtype, "to_v")(tokens).reshape(heads)
        pooled = nn.dot_product_attention(q, k, v).reshape(b, c)
        return dense(kinds, self.num_classes, self.dtype, "out", zero_init)(pooled)


# The classifier's heads: Classifier.pool names one.
POOLS = {"attention": AttentionPool, "mean": MeanPool}


class Classifier(nn.Module):
    """Noisy classifier: x (B, H, W, in_channels) in [-1, 1] and t (B,) -> float32 logits
    (B, num_classes) of p(y | x_t, t).

    Fields as the UNet's of the same names (ch, ch_mult, num_res_blocks, attn_resolutions,
    dropout, resamp_with_conv, downsample_padding, num_groups, norm_eps, num_heads,
    num_head_channels, flip_sin_to_cos, freq_shift, dtype, kernels), checked by the UNet's own
    checks; num_classes (>= 2) is the number of logits, pool a POOLS name.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    image_size: int
    in_channels: int
    num_classes: int
    pool: str = "attention"
    dropout: float = 0.0
    resamp_with_conv: bool = True
    downsample_padding: str = "same"
    num_groups: int = 32
    norm_eps: float = NORM_EPS
    num_heads: int = 1
    num_head_channels: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    dtype: str = "float32"
    kernels: str = "auto"

    def __post_init__(self):
        check_classifier_fields(self)
        super().__post_init__()

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level of ch_mult."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def _heads(self, width: int) -> int:
        return width // self.num_head_channels if self.num_head_channels else self.num_heads

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, self.in_channels):
            raise ValueError(
                f"Classifier: x has shape {tuple(x.shape)}; expected (B, {s}, {s}, "
                f"{self.in_channels}) (NHWC, image_size and in_channels from the config)"
            )
        if jnp.shape(t) != (x.shape[0],):
            raise ValueError(
                f"Classifier: t has shape {jnp.shape(t)}; expected ({x.shape[0]},), one per image"
            )
        dtype = DTYPES[self.dtype]
        kinds = layer_kinds(self.kernels, dtype)
        temb = TimestepEmbedding(4 * self.ch, dtype, self.kernels, name="time_embedding")(
            timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)
        )
        h, _ = encode(self, x, temb, train, dtype)
        heads = self._heads(h.shape[-1])
        h = kinds.group_norm(self.num_groups, self.norm_eps, dtype, "norm_out", act=True)(h)
        logits = POOLS[self.pool](self.num_classes, heads, dtype, self.kernels, name="head")(h)
        return logits.astype(jnp.float32)


# The fields the classifier takes from the UNet (checked by the UNet's checks): both modules'
# dataclass fields but Flax's own and num_classes, which means the logits here.
_SHARED_WITH_UNET = tuple(
    f.name
    for f in dataclasses.fields(Classifier)
    if f.name in {g.name for g in dataclasses.fields(UNet)} - {"parent", "name", "num_classes"}
)


def check_classifier_fields(m: Classifier) -> None:
    """Raise ValueError naming the field, its value and what is allowed: the fields shared with
    the UNet by the UNet's checks, then num_classes and pool."""
    shared = {name: getattr(m, name) for name in _SHARED_WITH_UNET}
    proxy = types.SimpleNamespace(**shared, out_channels=None, num_classes=0, cond_channels=0)
    if isinstance(m.ch_mult, tuple | list) and isinstance(m.image_size, int):
        proxy.resolutions = tuple(m.image_size // 2**i for i in range(len(m.ch_mult)))
    try:
        check_unet_fields(proxy)
    except ValueError as e:
        raise ValueError(str(e).replace("UNet:", "Classifier:", 1)) from None
    n = m.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"Classifier: num_classes={n!r}; must be an integer >= 2")
    if m.pool not in POOLS:
        raise ValueError(f"Classifier: pool={m.pool!r}; allowed: {', '.join(map(repr, POOLS))}")
