"""A perceptual distance between two images of one scene, in the FID InceptionV3's features.

The form is LPIPS's (Zhang et al. 2018, eq. 1) with every channel weighted 1, the paper's
uncalibrated baseline: at each of LAYERS, unit-normalise the feature vector of every spatial
position, square the difference between the two images' vectors, average over positions, and
sum over the layers. 0 for identical images; larger for images whose edges and textures differ,
which PSNR, a per-pixel distance, weighs the same as a smooth shift. Inputs are resized to
299x299 as for FID. It uses the FID weights this package already converts (no other download),
so its values are not those of the calibrated LPIPS (AlexNet or VGG with learned weights).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.metrics.inception import InceptionV3, _num_classes, load_inception_params

# Early edges (147x147), mid-level parts (35x35 and 17x17) and the last block (8x8).
LAYERS = ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")
_EPS = 1e-10  # LPIPS's guard against a zero feature vector


def _unit(f):
    """Each position's channel vector divided by its L2 norm (LPIPS's normalize_tensor)."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)


def layer_features(variables, x) -> dict:
    """{layer: (B, H, W, C)} of LAYERS for NHWC images in [-1, 1] (resized to 299x299)."""
    model = InceptionV3(_num_classes(variables))
    _, state = model.apply(
        variables,
        x,
        capture_intermediates=lambda module, method: module.name in LAYERS,
        mutable=["intermediates"],
    )
    return {name: state["intermediates"][name]["__call__"][0] for name in LAYERS}


@jax.jit
def _distance(variables, x, y):
    fx, fy = layer_features(variables, x), layer_features(variables, y)
    terms = [
        jnp.mean(jnp.sum(jnp.square(_unit(fx[n]) - _unit(fy[n])), axis=-1), axis=(1, 2))
        for n in LAYERS
    ]
    return sum(terms)


def perceptual_distance(variables, x, y, data_range: float = 255.0, batch_size: int = 8):
    """(N,) distances between images x and y (N, H, W, C), C 1 or 3, with values in [0, data_range]
    (uint8 or float: the mean of several samples is not an integer image)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected two arrays (N, H, W, 1 or 3) of one shape, got {x.shape} and {y.shape}"
        )
    if x.shape[-1] == 1:  # grayscale as RGB, as for FID
        x, y = np.repeat(x, 3, axis=-1), np.repeat(y, 3, axis=-1)
    out = []
    for start in range(0, len(x), batch_size):
        # To [-1, 1] on the host, padded to a full batch: one compiled program for every call.
        pair = [a[start : start + batch_size] / (data_range / 2) - 1.0 for a in (x, y)]
        pad = batch_size - len(pair[0])
        pair = [np.concatenate([a, np.zeros((pad, *a.shape[1:]))]).astype(np.float32) for a in pair]
        out.append(np.asarray(_distance(variables, *pair))[: batch_size - pad])
    return np.concatenate(out)


def distance(x, y, data_range: float = 255.0) -> np.ndarray:
    """perceptual_distance with the converted FID weights of the cache dir (as psnr and ssim:
    (x, y, data_range) -> (N,))."""
    return perceptual_distance(load_inception_params(), x, y, data_range)
