"""A small CNN classifier of the embedded 8x8 digits: the FID/IS feature network for that set.

InceptionV3 knows nothing of 8x8 digits, so FID and IS on the digits set use this network
instead: `digits_features` gives its penultimate activations (N, 64) for Frechet distances,
`digits_logits` its class logits (N, 10) for the Inception Score. It is trained once, on the
'train' split with a fixed seed (about 10 s on two CPU cores), and cached as .npz in the cache
dir; numbers from it compare only with numbers from the same cached file.
"""

import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffusion_jax.data import load_digits, to_model_range
from diffusion_jax.metrics.cache import default_cache_dir, load_tree, save_tree

# Bump when the architecture or the training recipe changes, so old caches are not reused.
CACHE_FILENAME = "digits_classifier_v1.npz"
NUM_CLASSES = 10
FEATURE_DIM = 64
IMAGE_SHAPE = (8, 8, 1)
SEED = 0
EPOCHS = 15
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


class DigitsCNN(nn.Module):
    """(B, 8, 8, 1) in [-1, 1] -> (features (B, 64), logits (B, 10)).

    GELU rather than ReLU: with ReLU about a third of the penultimate units die, which makes
    the feature covariance singular and the Frechet distance fall back on its eps offset.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Conv(32, (3, 3))(x))
        x = nn.gelu(nn.Conv(64, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.gelu(nn.Dense(FEATURE_DIM)(x))
        return features, nn.Dense(NUM_CLASSES)(features)


def _check_images(images_uint8) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"expected uint8 digits images (N, 8, 8, 1), got {images.dtype} {images.shape}"
        )
    return images


@jax.jit
def _apply(variables, images_uint8):
    return DigitsCNN().apply(variables, to_model_range(images_uint8))


def digits_features(variables, images_uint8) -> np.ndarray:
    """Penultimate features (N, 64) float32 of uint8 digits (N, 8, 8, 1)."""
    return np.asarray(_apply(variables, _check_images(images_uint8))[0])


def digits_logits(variables, images_uint8) -> np.ndarray:
    """Class logits (N, 10) float32 of uint8 digits (N, 8, 8, 1)."""
    return np.asarray(_apply(variables, _check_images(images_uint8))[1])


def train_digits_classifier() -> dict:
    """Train on the 'train' split: Adam, EPOCHS epochs of shuffled batches, fixed seeds."""
    images, labels = load_digits("train")
    x = to_model_range(images)
    model = DigitsCNN()
    variables = model.init(jax.random.key(SEED), x[:1])
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(variables):
            logits = model.apply(variables, x)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    num_batches = len(x) // BATCH_SIZE  # drop the ragged tail: one compiled step shape
    for epoch in range(EPOCHS):
        order = rng.permutation(len(x))
        for i in range(num_batches):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            variables, opt_state, loss = step(variables, opt_state, x[idx], labels[idx])
        logging.log_every_n_seconds(
            logging.INFO, "digits classifier epoch %d loss %.4f", 5, epoch, loss
        )
    test_images, test_labels = load_digits("test")
    accuracy = np.mean(digits_logits(variables, test_images).argmax(axis=1) == test_labels)
    logging.info(
        "digits classifier trained in %.1f s, test accuracy %.4f",
        time.perf_counter() - start,
        accuracy,
    )
    return variables


def get_digits_classifier(cache_dir=None) -> dict:
    """The classifier's variables: loaded from `cache_dir` (default: the cache dir), else
    trained once and saved there."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILENAME
    if path.is_file():
        variables = load_tree(path)
        want = jax.eval_shape(DigitsCNN().init, jax.random.key(SEED), jnp.zeros((1, *IMAGE_SHAPE)))
        if jax.tree.map(np.shape, variables) != jax.tree.map(lambda s: s.shape, want):
            raise ValueError(f"{path} does not match DigitsCNN; delete it to retrain")
        return variables
    variables = jax.device_get(train_digits_classifier())
    save_tree(path, variables)
    return variables
