"""Config-driven UNet of DDPM (Ho et al. 2020), laid out like diffusers' UNet2DModel.

Parameter tree (names as in diffusers, list indices joined with "_"):
conv_in, time_embedding/{linear_1, linear_2}, class_embedding (num_classes > 0),
down_blocks_i/{resnets_j, attentions_j, downsamplers_0}, mid_block/{resnets_0, attentions_0,
resnets_1}, up_blocks_i/{resnets_j (num_res_blocks + 1, skip concatenation), attentions_j,
upsamplers_0}, conv_norm_out, conv_out. With ch_mult[0] == 1 a diffusers UNet2DModel of the same
shape maps one-to-one (see diffusion_jax.interop.diffusers).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import (
    DOWNSAMPLE_PADDINGS,
    KERNELS,
    NORM_EPS,
    AttentionBlock,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    conv,
    layer_kinds,
    timestep_embedding,
    zero_init,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DownBlock(nn.Module):
    """num_res_blocks ResnetBlocks (each followed by attention if use_attn), then Downsample.
    Returns the output and every intermediate activation for the skip connections."""

    out_channels: int
    num_res_blocks: int
    use_attn: bool
    add_downsample: bool
    dropout: float
    num_groups: int
    norm_eps: float
    num_heads: int
    resamp_with_conv: bool
    downsample_padding: str
    dtype: Any
    kernels: str

    @nn.compact
    def __call__(self, h, temb, train):
        skips = []
        for j in range(self.num_res_blocks):
            h = ResnetBlock(
                self.out_channels,
                self.dropout,
                self.num_groups,
                self.norm_eps,
                self.dtype,
                self.kernels,
                name=f"resnets_{j}",
            )(h, temb, train)
            if self.use_attn:
                h = AttentionBlock(
                    self.num_heads,
                    self.num_groups,
                    self.norm_eps,
                    self.dtype,
                    self.kernels,
                    name=f"attentions_{j}",
                )(h)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(
                self.resamp_with_conv,
                self.downsample_padding,
                self.dtype,
                self.kernels,
                name="downsamplers_0",
            )(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    dropout: float
    num_groups: int
    norm_eps: float
    num_heads: int
    dtype: Any
    kernels: str

    @nn.compact
    def __call__(self, h, temb, train):
        c = h.shape[-1]
        resnet = (c, self.dropout, self.num_groups, self.norm_eps, self.dtype, self.kernels)
        h = ResnetBlock(*resnet, name="resnets_0")(h, temb, train)
        h = AttentionBlock(
            self.num_heads,
            self.num_groups,
            self.norm_eps,
            self.dtype,
            self.kernels,
            name="attentions_0",
        )(h)
        return ResnetBlock(*resnet, name="resnets_1")(h, temb, train)


class UpBlock(nn.Module):
    """One ResnetBlock per skip (skip concatenated after h on channels), each followed by
    attention if use_attn, then Upsample. `skips` are in the order the down path made them."""

    out_channels: int
    use_attn: bool
    add_upsample: bool
    dropout: float
    num_groups: int
    norm_eps: float
    num_heads: int
    resamp_with_conv: bool
    dtype: Any
    kernels: str

    @nn.compact
    def __call__(self, h, skips, temb, train):
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResnetBlock(
                self.out_channels,
                self.dropout,
                self.num_groups,
                self.norm_eps,
                self.dtype,
                self.kernels,
                name=f"resnets_{j}",
            )(h, temb, train)
            if self.use_attn:
                h = AttentionBlock(
                    self.num_heads,
                    self.num_groups,
                    self.norm_eps,
                    self.dtype,
                    self.kernels,
                    name=f"attentions_{j}",
                )(h)
        if self.add_upsample:
            h = Upsample(self.resamp_with_conv, self.dtype, self.kernels, name="upsamplers_0")(h)
        return h


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def check_unet_fields(m: "UNet") -> None:
    """Raise ValueError naming the field, its value and what is allowed."""
    for name in ("ch", "num_res_blocks", "image_size", "in_channels", "num_groups", "num_heads"):
        v = getattr(m, name)
        if not _is_int(v) or v <= 0:
            raise ValueError(f"UNet: {name}={v!r}; must be a positive integer")
    for name in ("out_channels", "num_head_channels"):
        v = getattr(m, name)
        if v is not None and (not _is_int(v) or v <= 0):
            raise ValueError(f"UNet: {name}={v!r}; must be None or a positive integer")
    for name in ("num_classes", "cond_channels"):
        v = getattr(m, name)
        if not _is_int(v) or v < 0:
            raise ValueError(f"UNet: {name}={v!r}; must be an integer >= 0 (0 = off)")
    ch_mult = m.ch_mult
    if not isinstance(ch_mult, tuple | list) or not ch_mult:
        raise ValueError(f"UNet: ch_mult={ch_mult!r}; must be a non-empty tuple of integers")
    if not all(_is_int(k) and k > 0 for k in ch_mult):
        raise ValueError(f"UNet: ch_mult={ch_mult!r}; every multiplier must be a positive integer")
    attn = m.attn_resolutions
    if not isinstance(attn, tuple | list) or not all(_is_int(r) for r in attn):
        raise ValueError(f"UNet: attn_resolutions={attn!r}; must be a tuple of spatial sizes")
    if isinstance(m.dropout, bool) or not isinstance(m.dropout, int | float):
        raise ValueError(f"UNet: dropout={m.dropout!r}; must be a number in [0, 1)")
    if not 0 <= m.dropout < 1:
        raise ValueError(f"UNet: dropout={m.dropout!r}; must be in [0, 1)")
    for name in ("resamp_with_conv", "flip_sin_to_cos"):
        if not isinstance(getattr(m, name), bool):
            raise ValueError(f"UNet: {name}={getattr(m, name)!r}; must be True or False")
    if not _is_number(m.norm_eps) or not m.norm_eps > 0:
        raise ValueError(f"UNet: norm_eps={m.norm_eps!r}; must be a positive number")
    if not _is_number(m.freq_shift) or not m.freq_shift < m.ch // 2:
        raise ValueError(
            f"UNet: freq_shift={m.freq_shift!r}; must be a number below ch // 2 = {m.ch // 2} "
            "(the sinusoidal embedding's frequencies are max_period ** (-i / (ch // 2 - "
            "freq_shift)))"
        )
    if m.kernels not in KERNELS:
        raise ValueError(
            f"UNet: kernels={m.kernels!r}; allowed: {', '.join(map(repr, KERNELS))} "
            "(models/layers.py KERNELS says what each computes)"
        )
    if m.dtype not in DTYPES:
        raise ValueError(f"UNet: dtype={m.dtype!r}; allowed: {', '.join(map(repr, DTYPES))}")
    if m.downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(
            f"UNet: downsample_padding={m.downsample_padding!r}; "
            f"allowed: {', '.join(map(repr, DOWNSAMPLE_PADDINGS))}"
        )
    factor = 2 ** (len(ch_mult) - 1)
    if m.image_size % factor:
        raise ValueError(
            f"UNet: image_size={m.image_size} is not divisible by 2**(len(ch_mult)-1)={factor} "
            f"(ch_mult={tuple(ch_mult)} halves the size {len(ch_mult) - 1} times)"
        )
    sizes = m.resolutions
    missing = [r for r in attn if r not in sizes]
    if missing:
        raise ValueError(
            f"UNet: attn_resolutions={tuple(attn)} contains {missing}, which never occur; "
            f"the spatial sizes of this UNet are {sizes}"
        )
    if m.ch % m.num_groups:
        raise ValueError(
            f"UNet: ch={m.ch} is not divisible by num_groups={m.num_groups} (GroupNorm; every "
            "width is a multiple of ch)"
        )
    attn_widths = {m.ch * k for k, r in zip(ch_mult, sizes, strict=True) if r in attn}
    for width in sorted(attn_widths | {m.ch * ch_mult[-1]}):
        if m.num_head_channels is not None and width % m.num_head_channels:
            raise ValueError(
                f"UNet: num_head_channels={m.num_head_channels} does not divide the {width} "
                "channels of an attention block"
            )
        if m.num_head_channels is None and width % m.num_heads:
            raise ValueError(
                f"UNet: num_heads={m.num_heads} does not divide the {width} channels of an "
                "attention block"
            )


def encode(m, x, temb, train: bool, dtype):
    """conv_in, the down blocks and the middle block of `m` (a UNet or a module with the same
    fields, such as the noisy classifier), called from inside m's compact __call__ so that the
    layers are m's own (conv_in, down_blocks_i, mid_block). Returns the middle block's output
    and the skip activations the UNet's up blocks take, outermost first."""
    kinds = layer_kinds(m.kernels, dtype)
    h = conv(kinds, m.ch, 3, dtype, "conv_in")(x)
    skips = [h]
    levels = len(m.ch_mult)
    for i, (mult, size) in enumerate(zip(m.ch_mult, m.resolutions, strict=True)):
        width = m.ch * mult
        h, block_skips = DownBlock(
            out_channels=width,
            num_res_blocks=m.num_res_blocks,
            use_attn=size in m.attn_resolutions,
            add_downsample=i < levels - 1,
            dropout=m.dropout,
            num_groups=m.num_groups,
            norm_eps=m.norm_eps,
            num_heads=m._heads(width),
            resamp_with_conv=m.resamp_with_conv,
            downsample_padding=m.downsample_padding,
            dtype=dtype,
            kernels=m.kernels,
            name=f"down_blocks_{i}",
        )(h, temb, train)
        skips.extend(block_skips)
    h = MidBlock(
        m.dropout,
        m.num_groups,
        m.norm_eps,
        m._heads(h.shape[-1]),
        dtype,
        m.kernels,
        name="mid_block",
    )(h, temb, train)
    return h, skips


class UNet(nn.Module):
    """DDPM UNet. x (B, H, W, in_channels) in [-1, 1], t (B,) int or float -> float32
    (B, H, W, out_channels).

    Fields: ch (base width), ch_mult (width multiplier per resolution level), num_res_blocks,
    attn_resolutions (spatial sizes with self-attention, e.g. (16,)), image_size, in_channels,
    out_channels (None = in_channels; 2 * in_channels for a learned variance), dropout,
    resamp_with_conv, downsample_padding ("same" as in the original DDPM, or "symmetric"),
    num_groups and norm_eps (every GroupNorm's groups and epsilon), num_heads, num_head_channels
    (when set, heads = channels // num_head_channels, overriding num_heads), flip_sin_to_cos and
    freq_shift (the sinusoidal timestep embedding, layers.timestep_embedding: the defaults are
    the original DDPM code's, diffusers' UNet2DModel defaults to True and 0), num_classes (> 0:
    class embedding of num_classes + 1 entries added to the output of the time embedding's MLP;
    label num_classes is the null label for classifier-free guidance), cond_channels (> 0: an
    image `cond_image` concatenated to x on channels, e.g. SR3's upsampled low-resolution input),
    dtype ("float32" or "bfloat16" compute; params float32), kernels (how the layers are
    computed: "auto", "xla" or "fast_cpu", see layers.KERNELS; the parameters are the same under
    each). Fields are checked when the module is constructed.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    image_size: int
    in_channels: int
    out_channels: int | None = None
    dropout: float = 0.0
    resamp_with_conv: bool = True
    downsample_padding: str = "same"
    num_groups: int = 32
    norm_eps: float = NORM_EPS
    num_heads: int = 1
    num_head_channels: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    num_classes: int = 0
    cond_channels: int = 0
    dtype: str = "float32"
    kernels: str = "auto"

    def __post_init__(self):
        check_unet_fields(self)
        super().__post_init__()

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level of ch_mult."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def _heads(self, width: int) -> int:
        return width // self.num_head_channels if self.num_head_channels else self.num_heads

    def _check_inputs(self, x, t, y, cond_image) -> None:
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, self.in_channels):
            raise ValueError(
                f"UNet: x has shape {tuple(x.shape)}; expected (B, {s}, {s}, {self.in_channels}) "
                "(NHWC, image_size and in_channels from the config)"
            )
        b = x.shape[0]
        if jnp.shape(t) != (b,):
            raise ValueError(f"UNet: t has shape {jnp.shape(t)}; expected ({b},), one per image")
        if self.num_classes:
            if y is None:
                raise ValueError(
                    f"UNet: y (class labels, shape ({b},)) is required since num_classes="
                    f"{self.num_classes}; label {self.num_classes} is the null label"
                )
            if jnp.shape(y) != (b,):
                raise ValueError(f"UNet: y has shape {jnp.shape(y)}; expected ({b},)")
        elif y is not None:
            raise ValueError("UNet: y was given but num_classes=0 (no class conditioning)")
        if self.cond_channels:
            expected = (b, s, s, self.cond_channels)
            if cond_image is None or tuple(jnp.shape(cond_image)) != expected:
                got = None if cond_image is None else tuple(jnp.shape(cond_image))
                raise ValueError(
                    f"UNet: cond_image has shape {got}; expected {expected} since cond_channels="
                    f"{self.cond_channels}"
                )
        elif cond_image is not None:
            raise ValueError(
                "UNet: cond_image was given but cond_channels=0 (no image conditioning)"
            )

    @nn.compact
    def __call__(self, x, t, train: bool = False, y=None, cond_image=None):
        self._check_inputs(x, t, y, cond_image)
        dtype = DTYPES[self.dtype]
        levels = len(self.ch_mult)
        temb_dim = 4 * self.ch

        kinds = layer_kinds(self.kernels, dtype)
        temb = TimestepEmbedding(temb_dim, dtype, self.kernels, name="time_embedding")(
            timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)
        )
        if self.num_classes:
            temb = temb + nn.Embed(
                self.num_classes + 1, temb_dim, dtype=dtype, name="class_embedding"
            )(y)
        if self.cond_channels:
            x = jnp.concatenate([x, cond_image], axis=-1)

        h, skips = encode(self, x, temb, train, dtype)

        n = self.num_res_blocks + 1
        for i in range(levels):
            level = levels - 1 - i
            width = self.ch * self.ch_mult[level]
            block_skips, skips = skips[-n:], skips[:-n]
            h = UpBlock(
                out_channels=width,
                use_attn=self.resolutions[level] in self.attn_resolutions,
                add_upsample=level > 0,
                dropout=self.dropout,
                num_groups=self.num_groups,
                norm_eps=self.norm_eps,
                num_heads=self._heads(width),
                resamp_with_conv=self.resamp_with_conv,
                dtype=dtype,
                kernels=self.kernels,
                name=f"up_blocks_{i}",
            )(h, block_skips, temb, train)

        h = kinds.group_norm(self.num_groups, self.norm_eps, dtype, "conv_norm_out", act=True)(h)
        out_channels = self.out_channels or self.in_channels
        h = conv(kinds, out_channels, 3, dtype, "conv_out", kernel_init=zero_init)(h)
        return h.astype(jnp.float32)
