"""Image conditioning (SR3's low-res input, a blurred image) from the batch to the samples, the
regression baseline and predict-and-refine.

The chain check uses Gaussian data whose posterior given the observation is known: 2x2 images
with pixels x ~ N(0, s^2) i.i.d., observed through the "sr" degradation as their 2x2 block mean
m (one pixel). Given m, x ~ N(m 1, s^2 (I - J / 4)): the block mean is m exactly and the rest
keeps variance s^2 * 3/4 per pixel. Its exact denoiser given the conditioning image is
E[eps | x_t, m] = sqrt(1 - abar) Sigma_t^{-1} (x_t - sqrt(abar) m 1), Sigma_t = abar S + (1 -
abar) I, which splits along 1 (variance 1 - abar) and its complement (abar s^2 + 1 - abar).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from train_harness import REPO, tiny_config

from diffusion_jax import degradations, generate, models, parallel, sample, training
from diffusion_jax.cli import UserError
from diffusion_jax.config import load_config
from diffusion_jax.data import to_model_range
from diffusion_jax.models.refiner import Refiner

SD = 0.2
LEVELS = (96, 128, 176)  # the observed block means, uint8
PER_LEVEL = 2048


def _mesh():
    return Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))


class ExactPosterior:
    """A stand-in for a Flax model: apply(variables, x_t, t, cond_image=...) -> E[eps | x_t, m]
    for the data above, m read from the (constant) conditioning image."""

    def __init__(self, schedule):
        self.alphas_cumprod = jnp.asarray(schedule.alphas_cumprod)

    def apply(self, variables, x, t, train=False, cond_image=None):
        del variables, train
        m = cond_image.mean(axis=(1, 2, 3), keepdims=True)
        abar = jnp.take(self.alphas_cumprod, t).reshape(-1, 1, 1, 1)
        d = x - jnp.sqrt(abar) * m
        along = d.mean(axis=(1, 2, 3), keepdims=True)  # the component along 1
        return jnp.sqrt(1 - abar) * (along / (1 - abar) + (d - along) / (abar * SD**2 + 1 - abar))


def _gaussian_config():
    return tiny_config(
        {
            "conditioning.degradation": "sr",
            "data.image_size": 2,
            "diffusion.num_timesteps": 1000,
            "sampling.clip_denoised": False,
            "sampling.batch_size": 2048,
        }
    )


def test_a_chain_conditioned_on_the_observation_samples_the_exact_posterior():
    config = _gaussian_config()
    schedule = training.make_schedule(config)
    sampler = generate.make_sampler(ExactPosterior(schedule), schedule, config, _mesh())
    observed = np.repeat(np.asarray(LEVELS, np.uint8), PER_LEVEL).reshape(-1, 1, 1, 1)
    conditions = generate.condition_images(config, observed)
    # bicubic upsampling of one pixel is that pixel everywhere: the network sees m itself (to
    # float32 rounding)
    m = np.broadcast_to(observed / 127.5 - 1, conditions.shape)
    np.testing.assert_allclose(conditions, m, atol=1e-6)
    x = sampler(
        {}, jax.random.key(0), len(observed), conditions=conditions, sampler="ddpm", steps=1000
    )
    x = np.asarray(to_model_range(x), np.float64)
    for i, level in enumerate(LEVELS):
        xs = x[i * PER_LEVEL : (i + 1) * PER_LEVEL]
        m = level / 127.5 - 1
        block_mean = xs.mean(axis=(1, 2, 3))
        # The block mean is fixed by the observation: only the uint8 rounding of the 4 pixels
        # (+-1/255 each) and the chain's discretisation move it.
        assert np.abs(block_mean - m).max() < 0.02, (level, np.abs(block_mean - m).max())
        # The rest keeps variance 3/4 s^2 per pixel: 8,192 correlated pixels, the std's
        # standard error is about 1.3%; 6% is over 4 of them.
        std = (xs - block_mean[:, None, None, None]).std()
        assert abs(std / (SD * np.sqrt(0.75)) - 1) < 0.06, (level, std)
    # New conditioning images of the same shape reuse the compiled chain.
    events = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = sampler(
            {},
            jax.random.key(0),
            len(observed),
            conditions=conditions[::-1],
            sampler="ddpm",
            steps=1000,
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, events
    assert abs(float(np.mean(to_model_range(again[:PER_LEVEL]))) - (176 / 127.5 - 1)) < 0.02


def test_the_sampler_wants_conditions_exactly_for_an_image_conditioned_model():
    config = _gaussian_config()
    with pytest.raises(ValueError, match="conditioned on images"):
        generate.check_conditions(config, None, 4)
    with pytest.raises(ValueError, match=r"shape \(4, 2, 2, 1\)"):
        generate.check_conditions(config, np.zeros((4, 1, 1, 1)), 4)
    with pytest.raises(ValueError, match="without image conditioning"):
        generate.check_conditions(tiny_config(), np.zeros((4, 8, 8, 1)), 4)


def test_the_train_step_degrades_the_clean_batch_and_the_model_sees_it():
    config = tiny_config({"conditioning.degradation": "sr"})
    assert training.model_config(config).cond_channels == 1
    assert training.model_config(tiny_config()).cond_channels == 0
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    kwargs = training.model_kwargs_from_batch({"image": images}, config)
    low = images.reshape(4, 4, 2, 4, 2, 1).astype(np.int64).sum(axis=(2, 4))
    low = ((low + 2) // 4).astype(np.uint8)  # the box filter, rounded half up
    expected = degradations.bicubic_upsample(to_model_range(low), 2)
    np.testing.assert_allclose(kwargs["cond_image"], expected, atol=1e-6)
    given = training.model_kwargs_from_batch({"image": images, "cond_image": expected + 1}, config)
    np.testing.assert_allclose(given["cond_image"], expected + 1)  # a batch's own is kept


def _tiny_model(config):
    return models.create_model(training.model_config(config))


def _init(model, config, seed=0):
    optimizer, _ = training.make_optimizer(config)
    return training.init_state(model, optimizer, config, jax.random.key(seed)).params


REGRESSION = {"conditioning.degradation": "sr", "training.objective": "regression"}


def test_an_untrained_regression_model_predicts_the_bicubic_upsampling():
    """predict(net, y) = y + net(y, 0) with a zero-initialised output layer: the loss at init
    is the MSE of the conditioning image itself, and the predictions are the bicubic image."""
    config = tiny_config(REGRESSION)
    model = _tiny_model(config)
    params = _init(model, config)
    images = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    y = training.model_kwargs_from_batch({"image": images}, config)["cond_image"]
    loss_fn = training.make_regression_loss_fn(model, None, config)
    loss, terms = jax.jit(loss_fn)(params, {"image": images}, jax.random.key(0))
    mse = np.mean((np.asarray(y) - np.asarray(to_model_range(images))) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms["loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(loss, mse.mean(), rtol=1e-5)
    predictor = generate.make_sampler(model, None, config, _mesh())
    out = predictor(params, None, 8, conditions=np.asarray(y))
    np.testing.assert_array_equal(out, generate.to_uint8(np.asarray(y)))


REFINE = {
    "conditioning.degradation": "blur",
    "conditioning.blur_sigma": 1.0,
    "model.name": "refiner",
}


def _refine_setup():
    config = tiny_config(REFINE)
    config.model.update(predictor_ch=16, predictor_ch_mult=(1,), predictor_num_res_blocks=1)
    model = _tiny_model(config)
    assert isinstance(model, Refiner) and model.cond_channels == 1
    params = _init(model, config)
    # Perturb every parameter so that the zero-initialised output layers do not hide anything.
    params = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    return config, model, params


@pytest.mark.slow  # compiles the gradient of two UNets: over a minute on 2 cores
def test_the_refiners_loss_trains_the_predictor_by_l2_alone_and_diffuses_the_residual():
    config, model, params = _refine_setup()
    assert set(params) == {"denoiser", "predictor"}
    images = np.random.default_rng(2).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    batch, key = {"image": images}, jax.random.key(3)
    loss_fn = training.make_loss_fn(model, training.make_schedule(config), config)
    (_, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, key)
    y = training.model_kwargs_from_batch(batch, config, jax.random.fold_in(key, 1))["cond_image"]
    x0 = to_model_range(images)

    def predictor_loss(p):
        g = model.apply(
            {"params": p},
            y,
            train=True,
            rngs={"dropout": jax.random.key(0)},
            method=Refiner.predict_clean,
        )
        return jnp.mean(jnp.square(g - x0), axis=(1, 2, 3))

    np.testing.assert_allclose(terms["predictor_loss"], predictor_loss(params), rtol=1e-4)
    # The diffusion loss reaches no predictor parameter: its gradient is the L2 loss's alone, up
    # to the float32 summation order of two differently fused programs (1e-3 of the largest
    # gradient entry; a leak of the diffusion loss would move them by their own size).
    l2_grads = jax.jit(jax.grad(lambda p: jnp.mean(predictor_loss(p))))(params)
    wanted = jax.tree.leaves(l2_grads["predictor"])
    scale = max(float(np.abs(w).max()) for w in wanted)
    for got, want in zip(jax.tree.leaves(grads["predictor"]), wanted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * scale)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["denoiser"]))


def test_a_refiners_sample_is_its_prediction_plus_the_sampled_residual():
    """With the denoiser blind to g(y) (its input weights for those channels zeroed), raising
    g(y) by c (the predictor's output bias) raises every sample by c exactly."""
    config, model, params = _refine_setup()
    kernel = params["denoiser"]["conv_in"]["kernel"]  # (3, 3, x | y | g(y), ch)
    params["denoiser"]["conv_in"]["kernel"] = kernel.at[:, :, 2:3, :].set(0.0)
    shifted = jax.tree.map(jnp.copy, params)
    c = 20 / 127.5  # 20 grey levels
    shifted["predictor"]["conv_out"]["bias"] = params["predictor"]["conv_out"]["bias"] + c
    schedule = training.make_schedule(config)
    sampler = generate.make_sampler(model, schedule, config, _mesh())
    blurred = np.random.default_rng(4).integers(60, 200, (16, 8, 8, 1), dtype=np.uint8)
    conditions = generate.condition_images(config, blurred)
    key = jax.random.key(5)
    base = sampler(params, key, 16, conditions=conditions).astype(int)
    raised = sampler(shifted, key, 16, conditions=conditions).astype(int)
    inside = (base > 0) & (base < 235)  # neither copy clipped to [0, 255]
    assert inside.mean() > 0.25  # hundreds of pixels
    np.testing.assert_array_equal((raised - base)[inside], 20)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_the_condition_file_is_checked_and_repeated_per_sample(tmp_path):
    config = tiny_config({"conditioning.degradation": "sr"})
    low = np.random.default_rng(6).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    path = _write(tmp_path / "lr.npz", images=low)
    conditions, index = sample.load_condition(path, config, 6)
    np.testing.assert_array_equal(index, [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(conditions[3], generate.condition_images(config, low)[1])
    assert len(sample.load_condition(path, config, None)[0]) == 3
    bad = [
        (_write(tmp_path / "f.npz", images=low.astype(np.float32)), None, "uint8"),
        (_write(tmp_path / "s.npz", images=low[:, :2]), None, r"\(N, 4, 4, 1\)"),
        (_write(tmp_path / "k.npz", x=low), None, "no array 'images'"),
        (path, 4, "multiple of the 3 observations"),
    ]
    for file, num_samples, pattern in bad:
        with pytest.raises(UserError, match=pattern):
            sample.load_condition(file, config, num_samples)
    with pytest.raises(UserError, match="not conditioned on images"):
        sample.load_condition(path, tiny_config(), None)


def test_the_schedule_flag_picks_the_chains_schedule_and_is_checked():
    sr3 = load_config(str(REPO / "configs" / "sr3_photos.py"))
    assert sr3.sampling.schedule.num_timesteps == 100
    trained = sample.with_schedule(sr3, "train")
    assert trained.sampling.schedule.name == "" and trained.sampling.steps == 2000
    other = sample.with_schedule(sr3, "cosine:50")
    assert other.sampling.schedule.to_dict() == dict(
        name="cosine", num_timesteps=50, beta_start=None, beta_end=None
    )
    assert other.sampling.steps == 50 and sr3.sampling.schedule.num_timesteps == 100
    assert sample.with_schedule(sr3, "linear:100:1e-4:0.1").sampling.schedule.beta_end == 0.1
    for text, pattern in [
        ("linear", "expected 'train', NAME:T"),
        ("linear:100:0.1", "expected 'train', NAME:T"),
        ("linear:x", "expected 'train', NAME:T"),
        ("wavy:100", "sampling.schedule"),
    ]:
        with pytest.raises(UserError, match=pattern):
            sample.with_schedule(sr3, text)
    with pytest.raises(UserError, match="noise_conditioning"):
        sample.with_schedule(tiny_config(), "linear:20")
