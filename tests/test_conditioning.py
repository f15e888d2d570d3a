"""Class conditioning and classifier-free guidance, checked on per-class Gaussian data.

Class k of K has pixels x_0 ~ N(mu_k, s^2) independently, so the exact conditional denoiser
E[eps | x_t, y = k] is gaussian_data's closed form with mu = mu_k; the null label K gets the
exact unconditional (mixture) denoiser sum_k p(k | x_t) E[eps | x_t, k], with p(k | x_t) from
the K Gaussian likelihoods of the whole image.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import optimal_eps_fn
from jax.sharding import Mesh

from diffusion_jax import generate, guidance, models, parallel, samplers, schedules, training
from diffusion_jax.config import load_config, override

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cfg_digits.py")
MUS = (-0.5, 0.0, 0.4)
SD = 0.2
K = len(MUS)
PER_CLASS = 2048
SHAPE = (K * PER_CLASS, 2, 2, 1)  # 8,192 scalars per class: standard error of the std ~0.8%


@pytest.fixture(scope="module")
def s():
    return schedules.make_schedule("linear", 1000)


def class_eps_fn(s, calls=None):
    """denoise_fn(x_t, t, y): the exact conditional eps for y < K, the mixture's for y = K.
    `calls` (a list) receives the batch size of each call."""
    per_class = [optimal_eps_fn(s, mu, SD) for mu in MUS]

    def denoise_fn(x_t, t, y):
        if calls is not None:
            calls.append(x_t.shape[0])
        eps = jnp.stack([f(x_t, t) for f in per_class])  # (K, B, ...)
        abar = jnp.take(s.alphas_cumprod, t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        var = abar * SD**2 + 1 - abar
        mus = jnp.asarray(MUS).reshape((K,) + (1,) * x_t.ndim)
        log_lik = -0.5 * jnp.sum((x_t - jnp.sqrt(abar) * mus) ** 2 / var, axis=(2, 3, 4))
        posterior = jax.nn.softmax(log_lik, axis=0).reshape(eps.shape[:2] + (1, 1, 1))
        mixture = jnp.sum(posterior * eps, axis=0)
        onehot = jax.nn.one_hot(y, K + 1).T.reshape((K + 1, -1) + (1,) * (x_t.ndim - 1))
        return jnp.sum(onehot[:K] * eps, axis=0) + onehot[K] * mixture

    return denoise_fn


LABELS = jnp.arange(SHAPE[0]) % K


def _assert_classes(x, labels, rel):
    x, labels = np.asarray(x), np.asarray(labels)
    for k, mu in enumerate(MUS):
        xk = x[labels == k]
        assert abs(xk.mean() - mu) < rel * SD, (k, xk.mean(), mu)
        assert abs(xk.std() / SD - 1) < rel, (k, xk.std(), SD)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddim", 1000)])
def test_chains_with_the_exact_conditional_eps_reproduce_each_class(s, sampler, steps):
    fn = class_eps_fn(s)
    x = jax.jit(
        lambda k: samplers.sample(
            fn,
            s,
            SHAPE,
            k,
            sampler=sampler,
            num_steps=steps,
            clip_denoised=False,
            model_kwargs={"y": LABELS},
        )
    )(jax.random.key(0))
    # Sampling error ~1% of s per class, DDPM's fixed variance's bias ~1%: 5%.
    _assert_classes(x, LABELS, 0.05)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_guidance_zero_is_the_conditional_model_exactly_in_every_chain(s, sampler):
    fn = class_eps_fn(s)
    kw = dict(sampler=sampler, num_steps=20, clip_denoised=False, model_kwargs={"y": LABELS[:64]})
    key = jax.random.key(1)
    plain = samplers.sample(fn, s, (64, 2, 2, 1), key, **kw)
    guided = samplers.sample(guidance.classifier_free(fn, 0.0, K), s, (64, 2, 2, 1), key, **kw)
    np.testing.assert_array_equal(plain, guided)
    _assert_classes(plain, LABELS[:64], 0.6)  # 20 steps, 21 samples a class: the right classes


def test_guided_eps_is_the_formula_with_both_halves_in_one_call(s):
    calls = []
    fn = class_eps_fn(s, calls)
    x = jax.random.normal(jax.random.key(2), (6, 2, 2, 1))
    t = jnp.array([0, 100, 300, 500, 700, 999])
    y = jnp.array([0, 1, 2, 0, 1, 2])
    w = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    out = guidance.classifier_free(fn, w, K)(x, t, y=y)
    assert calls == [12]  # one call on the doubled batch
    cond, uncond = fn(x, t, y), fn(x, t, jnp.full_like(y, K))
    expected = (1 + w[:, None, None, None]) * cond - w[:, None, None, None] * uncond
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # And a scalar weight, traced: one compiled function for every w.
    jitted = jax.jit(lambda w: guidance.classifier_free(fn, w, K)(x, t, y=y))
    for scalar in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(
            jitted(scalar), (1 + scalar) * cond - scalar * uncond, rtol=1e-6, atol=1e-6
        )
    assert jitted._cache_size() == 1


def test_learned_variance_guides_the_mean_only_and_other_kwargs_are_repeated():
    seen = {}

    def fn(x_t, t, y, cond_image):
        seen["cond_image"] = cond_image
        mean = x_t * (1.0 + y[:, None, None, None])
        var = jnp.broadcast_to((10.0 * y)[:, None, None, None], x_t.shape)
        return jnp.concatenate([mean, var], axis=-1)

    x = jnp.ones((2, 2, 2, 1))
    cond_image = jnp.arange(2.0).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 3))
    y = jnp.array([0, 1])
    out = guidance.classifier_free(fn, 2.0, 5, "learned_range")(
        x, jnp.zeros(2, jnp.int32), y=y, cond_image=cond_image
    )
    # mean: 3 (1 + y) - 2 (1 + 5); variance channels: the conditional half's 10 y.
    np.testing.assert_allclose(out[..., 0], np.array([-9.0, -6.0])[:, None, None] * np.ones((2, 2)))
    np.testing.assert_allclose(out[..., 1], np.array([0.0, 10.0])[:, None, None] * np.ones((2, 2)))
    np.testing.assert_array_equal(seen["cond_image"], jnp.concatenate([cond_image, cond_image]))


def test_label_dropout_rate_is_p_uncond():
    config = load_config(CONFIG)
    override(config, {"conditioning.p_uncond": 0.2})
    n = 200_000
    labels = jnp.arange(n, dtype=jnp.int32) % 10
    y = training.model_kwargs_from_batch({"label": labels}, config, jax.random.key(3))["y"]
    dropped = np.asarray(y) == 10
    # Binomial(n, 0.2): standard deviation of the rate sqrt(0.2 * 0.8 / n) = 0.00089; 5 of them.
    assert abs(dropped.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / n), dropped.mean()
    np.testing.assert_array_equal(np.asarray(y)[~dropped], np.asarray(labels)[~dropped])
    # No key (init, bits/dim, sampling): the labels as they are.
    kept = training.model_kwargs_from_batch({"label": labels}, config)["y"]
    np.testing.assert_array_equal(kept, labels)
    # An unconditional config gives the model no labels.
    override(config, {"model.num_classes": 0})
    assert training.model_kwargs_from_batch({"label": labels}, config, jax.random.key(3)) == {}


def test_the_loss_feeds_the_model_the_dropped_labels():
    config = load_config(CONFIG)
    override(config, {"conditioning.p_uncond": 0.5, "diffusion.num_timesteps": 50})
    seen = []

    class Stub:
        def apply(self, variables, x, t, *, train, rngs, y):
            seen.append(np.asarray(y))
            return jnp.zeros_like(x)

    loss = training.make_loss_fn(Stub(), training.make_schedule(config), config)
    batch = {"image": np.zeros((4000, 8, 8, 1), np.uint8), "label": np.full((4000,), 3, np.int32)}
    loss({}, batch, jax.random.key(4))
    (y,) = seen
    assert set(np.unique(y).tolist()) == {3, 10}
    # Binomial(4000, 0.5): standard deviation of the rate 0.0079; 5 of them.
    assert abs(np.mean(y == 10) - 0.5) < 5 * 0.0079


def tiny_conditional_config():
    config = load_config(CONFIG)
    override(
        config,
        {
            "model.ch": 16,
            "model.ch_mult": (1,),
            "model.attn_resolutions": (),
            "model.num_groups": 8,
            "diffusion.num_timesteps": 40,
            "sampling.steps": 5,
            "sampling.batch_size": 16,
        },
    )
    return config


@pytest.mark.slow
def test_sampler_does_not_recompile_for_new_labels_guidance_or_steps():
    config = tiny_conditional_config()
    model = models.create_model(training.model_config(config))
    optimizer, _ = training.make_optimizer(config)
    params = training.init_state(model, optimizer, config, jax.random.key(0)).params
    params = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))  # compiles faster
    sample = generate.make_sampler(model, training.make_schedule(config), config, mesh)
    key = jax.random.key(1)
    events = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            events.append(event)

    first = sample(params, key, 16)  # labels cycled, config's guidance 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = sample(params, key, 16, labels=np.full(16, 3), guidance=0.0)
        sample(params, key, 16, labels=np.arange(16) % 2, guidance=5.0, steps=3)
        sample(params, key, 16, guidance=2.0, steps=5, sampler="ddim", eta=0.5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, events
    assert not np.array_equal(first, again)  # the labels and the weight reached the model
    np.testing.assert_array_equal(sample(params, key, 16), first)
    with pytest.raises(ValueError, match="outside the model's classes 0..9"):
        sample(params, key, 16, labels=np.full(16, 10))
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        sample(params, key, 16, guidance=-1.0)


def test_class_grid_puts_one_class_per_row(tmp_path):
    from PIL import Image

    from diffusion_jax import grid

    labels = np.arange(6) % 3
    images = (labels * 100).astype(np.uint8).reshape(6, 1, 1, 1) * np.ones((6, 2, 2, 1), np.uint8)
    path = grid.save_class_grid(images, labels, tmp_path / "g.png", min_cell=2)
    with Image.open(path) as im:
        pixels = np.asarray(im)
    assert pixels.shape == (3 * 3 + 1, 2 * 3 + 1)  # 3 rows (classes) of 2 columns
    for row, value in enumerate((0, 100, 200)):
        assert (pixels[1 + 3 * row : 3 + 3 * row, 1:3] == value).all()
        assert (pixels[1 + 3 * row : 3 + 3 * row, 4:6] == value).all()
