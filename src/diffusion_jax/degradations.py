"""Degradations that make a conditioning image from a clean one: pure, jittable JAX on batches.

Every function takes a batch (B, H, W, C), either float in [-1, 1] (the model's range) or uint8
in [0, 255], and returns the same kind: float stays float; uint8 is computed in float32 and
rounded back to uint8 (the rounding each function names). Sizes, factors and sigmas are static
Python numbers (they fix shapes and kernels), so they are read from the config at the edge.

`DEGRADATIONS` is the table the train step reads: `DEGRADATIONS[name](clean, cfg, key)` with
cfg = config.conditioning returns the conditioning image the network sees (float32 [-1, 1],
full size), made on the device from the clean batch. Each entry is two steps, so that sampling
can start from an observation of any origin (a uint8 file):

  observe(clean, cfg, key) -> the observation, float32 [-1, 1] on the uint8 grid (exactly what
                              a uint8 file of it holds, so training sees what sampling will)
  condition(observation, cfg) -> the conditioning image, (B, H, W, C)

  "sr"    observation: the uint8 image averaged over sr_factor x sr_factor blocks and rounded
          (half up), (B, H/f, W/f, C); condition: that low-res image bicubically upsampled
          (SR3's input, concatenated with x_t on channels)
  "blur"  observation: the image blurred by a Gaussian of standard deviation blur_sigma pixels
          (scipy.ndimage.gaussian_filter, reflect, truncate 4), rounded to uint8 levels;
          condition: the observation itself

Both add Gaussian noise of standard deviation noise_std (in [-1, 1] units: one grey level is
2/255) to the observation before rounding when noise_std > 0.

config.conditioning fields read here (with .get): sr_factor (int, default 2), blur_sigma
(float > 0, no default: "blur" needs it), noise_std (float >= 0, default 0).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma


def _is_uint8(x) -> bool:
    return jnp.asarray(x).dtype == jnp.uint8


def _round_uint8(x):
    """float32 values on the 0..255 scale -> uint8: clip, round half to even (as to_uint8)."""
    return jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def _check_factor(x, factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if x.ndim != 4:
        raise ValueError(f"expected a batch (B, H, W, C), got shape {x.shape}")


def box_downsample(x, factor: int):
    """Mean over non-overlapping factor x factor blocks: (B, H, W, C) -> (B, H/f, W/f, C).

    H and W must be multiples of factor. uint8 input: the block's integer sum, rounded half up,
    (sum + f^2 // 2) // f^2 (what PIL's Image.reduce(f) computes); float input: the exact mean.
    """
    x = jnp.asarray(x)
    _check_factor(x, factor)
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"box_downsample: size {h}x{w} is not a multiple of factor {factor}")
    blocks = x.reshape(b, h // factor, factor, w // factor, factor, c)
    area = factor * factor
    if x.dtype == jnp.uint8:
        total = jnp.sum(blocks.astype(jnp.int32), axis=(2, 4))
        return ((total + area // 2) // area).astype(jnp.uint8)
    return jnp.mean(blocks, axis=(2, 4))


def bicubic_upsample(x, factor: int):
    """Bicubic resize by an integer factor: (B, H, W, C) -> (B, fH, fW, C).

    jax.image.resize(method="bicubic"): Keys' cubic convolution kernel with a = -0.5, half-pixel
    centres (output pixel i samples input coordinate (i + 0.5) / f - 0.5). At the border the
    taps that fall outside the image are dropped and the remaining weights renormalised to sum
    to 1 (no padding), as PIL's BICUBIC resize does. uint8 input: computed in float32 on the
    0..255 scale, then clipped and rounded (half to even); float output is not clipped (the
    cubic kernel overshoots slightly at edges).
    """
    x = jnp.asarray(x)
    _check_factor(x, factor)
    b, h, w, c = x.shape
    y = jax.image.resize(x.astype(jnp.float32), (b, h * factor, w * factor, c), "bicubic")
    return _round_uint8(y) if x.dtype == jnp.uint8 else y


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: exp(-k^2 / (2 sigma^2)) for |k| <= int(truncate * sigma +
    0.5), normalised to sum 1 (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (k / sigma) ** 2)
    return weights / weights.sum()


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """scipy's mode='reflect' (d c b a | a b c d | d c b a: the edge sample repeated) for any
    offset, also ones more than n outside: the extension is periodic with period 2n."""
    index = np.mod(index, 2 * n)
    return np.where(index < n, index, 2 * n - 1 - index)


@functools.cache
def blur_matrix(n: int, sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """The 1-D Gaussian filter of a length-n signal as an (n, n) float64 matrix M, out = M @ in:
    row i holds the kernel's weights added at reflect_index(i + k), so kernels wider than the
    signal wrap around as scipy's reflect does."""
    weights = gaussian_kernel1d(sigma, truncate)
    radius = len(weights) // 2
    matrix = np.zeros((n, n))
    rows = np.arange(n)[:, None]
    cols = reflect_index(rows + np.arange(-radius, radius + 1)[None, :], n)
    np.add.at(matrix, (np.broadcast_to(rows, cols.shape), cols), weights[None, :])
    return matrix


def gaussian_blur(x, sigma: float, truncate: float = TRUNCATE):
    """Gaussian blur over H and W of each image and channel: what
    scipy.ndimage.gaussian_filter(image[..., c], sigma, mode="reflect", truncate=4.0) computes.

    Separable: the (H, H) and (W, W) blur matrices (reflect boundary folded in) applied at
    HIGHEST matmul precision, so the result is float32 accurate on every backend. sigma = 0
    returns the input. uint8 input: computed in float32, clipped and rounded (half to even).
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected a batch (B, H, W, C), got shape {x.shape}")
    sigma = float(sigma)
    if not sigma >= 0:
        raise ValueError(f"gaussian_blur: sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    _, h, w, _ = x.shape
    mh = jnp.asarray(blur_matrix(h, sigma, truncate), jnp.float32)
    mw = jnp.asarray(blur_matrix(w, sigma, truncate), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ij,bjwc->biwc", mh, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("kw,biwc->bikc", mw, y, precision=hi)
    return _round_uint8(y) if x.dtype == jnp.uint8 else y


def add_noise(x, std: float, key):
    """x + std * N(0, I), float input only (noise on uint8 values is added before rounding by
    the callers that store it)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"add_noise takes float images, got {x.dtype}")
    return x + std * jax.random.normal(key, x.shape, x.dtype)


def to_float(x):
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1); float input is returned as float32."""
    x = jnp.asarray(x)
    return x.astype(jnp.float32) / 127.5 - 1.0 if _is_uint8(x) else x.astype(jnp.float32)


def quantize(x):
    """float [-1, 1] -> the nearest of the 256 uint8 levels, in [-1, 1]: what writing the image
    as uint8 (to_uint8: clip, round half to even) and reading it back gives."""
    return (
        _round_uint8((jnp.asarray(x, jnp.float32) + 1.0) * 127.5).astype(jnp.float32) / 127.5 - 1.0
    )


def _noisy(observation, cfg, key):
    std = float(cfg.get("noise_std", 0.0))
    return add_noise(observation, std, key) if std > 0 else observation


# --- the table -------------------------------------------------------------------------


def _sr_observe(clean, cfg, key):
    clean = jnp.asarray(clean)
    pixels = clean if _is_uint8(clean) else _round_uint8((clean.astype(jnp.float32) + 1) * 127.5)
    low = to_float(box_downsample(pixels, int(cfg.get("sr_factor", 2))))
    return quantize(_noisy(low, cfg, key))


def _sr_condition(observation, cfg):
    return bicubic_upsample(to_float(observation), int(cfg.get("sr_factor", 2)))


def _blur_observe(clean, cfg, key):
    blurred = gaussian_blur(to_float(clean), float(cfg.get("blur_sigma")))
    return quantize(_noisy(blurred, cfg, key))


def _blur_condition(observation, cfg):
    del cfg
    return to_float(observation)


@dataclasses.dataclass(frozen=True)
class Degradation:
    """A conditioning image in two steps: observe (clean -> observation) and condition
    (observation -> what the network sees); observed_size(image_size, cfg) is the
    observation's height and width. Calling it does both."""

    observe: Callable
    condition: Callable
    observed_size: Callable[[int, object], int]
    doc: str

    def __call__(self, clean, cfg, key):
        """(clean batch uint8 or [-1, 1], config.conditioning, key) -> conditioning image."""
        return self.condition(self.observe(clean, cfg, key), cfg)


DEGRADATIONS: dict[str, Degradation] = {
    "sr": Degradation(
        _sr_observe,
        _sr_condition,
        lambda size, cfg: size // int(cfg.get("sr_factor", 2)),
        "box-downsampled by sr_factor (uint8, rounded), seen bicubically upsampled",
    ),
    "blur": Degradation(
        _blur_observe,
        _blur_condition,
        lambda size, cfg: size,
        "Gaussian blur of blur_sigma pixels (scipy's reflect, truncate 4), uint8 levels",
    ),
}


def configured(config) -> str:
    """config.conditioning.degradation: the DEGRADATIONS name of a model's conditioning image,
    "" for none (also for a config saved before the field existed)."""
    return config.get("conditioning", {}).get("degradation", "")


def observe_uint8(name: str, clean, cfg, key) -> np.ndarray:
    """The observation of degradation `name` as the uint8 file sampling reads: (B, h, w, C)
    numpy, e.g. LR.npz from a high-res test set (for "sr": box_downsample of the uint8 images)."""
    observation = DEGRADATIONS[name].observe(clean, cfg, key)
    return np.asarray(_round_uint8((observation + 1.0) * 127.5))


def check_config(name: str, cfg, image_size: int) -> None:
    """ValueError naming the field unless degradation `name` can run on images of image_size
    with config.conditioning `cfg` (for validation at the boundary, before anything compiles)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {sorted(DEGRADATIONS)}, got {name!r}")
    noise = cfg.get("noise_std", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"conditioning.noise_std must be a number >= 0, got {noise!r}")
    if name == "sr":
        factor = cfg.get("sr_factor", 2)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"conditioning.sr_factor must be an int >= 2, got {factor!r}")
        if image_size % factor:
            raise ValueError(
                f"conditioning.sr_factor={factor} does not divide data.image_size={image_size}"
            )
    if name == "blur":
        sigma = cfg.get("blur_sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"conditioning.blur_sigma must be a number > 0, got {sigma!r}")
