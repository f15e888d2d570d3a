"""The noisy classifier of classifier guidance: the model (the UNet's encoder, pooled heads),
its objective against an independent cross-entropy, training on a toy problem, the guidance
gradient through the real model, the config checks and loading a classifier workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from ml_collections import config_dict

from diffusion_jax import (
    checkpointing,
    classifier_guidance,
    models,
    samplers,
    schedules,
    training,
)
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.cli import UserError
from diffusion_jax.config import load_config, override
from diffusion_jax.validation import ConfigError, validate_config

TINY = dict(
    name="classifier",
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    image_size=8,
    in_channels=1,
    num_classes=2,
    num_groups=8,
    kernels="xla",
)


def tiny(**overrides):
    return models.create_model({**TINY, **overrides})


def apply_fn(model):
    return lambda params, x, t: model.apply({"params": params}, x, t)


def random_params(model, x, t):
    """N(0, 0.1^2) parameters of the right shapes (a fresh head is zero: uniform logits)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


def inputs(batch=4):
    x = jax.random.uniform(jax.random.key(0), (batch, 8, 8, 1), minval=-1.0, maxval=1.0)
    return x, jnp.arange(batch, dtype=jnp.int32) * 250


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_logits_shape_and_the_unet_encoder_parameters(pool):
    config = load_config("configs/classifier_digits.py" + (":mean" if pool == "mean" else ""))
    model = models.create_model(training.model_config(config))
    x, t = inputs()
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, x, t), params)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    # The encoder is the digits UNet's own blocks: same names, same shapes.
    unet_config = load_config("configs/ddpm_digits.py:short")
    unet = models.create_model(training.model_config(unet_config))
    unet_params = jax.eval_shape(unet.init, jax.random.key(0), x, t)["params"]
    shapes = lambda tree: {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}
    for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        assert shapes(params[name]) == shapes(unet_params[name]), name
    assert set(params) == {
        "conv_in",
        "time_embedding",
        "down_blocks_0",
        "down_blocks_1",
        "mid_block",
        "norm_out",
        "head",
    }


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_classes=1), "num_classes=1"),
        (dict(pool="max"), "pool='max'"),
        (dict(ch=12), "Classifier: ch=12 is not divisible by num_groups=8"),
        (dict(attn_resolutions=(3,)), "Classifier: attn_resolutions"),
    ],
)
def test_bad_fields_are_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_classifier_losses_equal_cross_entropy_at_x_t_computed_independently():
    s = schedules.make_schedule("linear", 1000)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, size=(6, 2, 2, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    t = np.array([0, 1, 100, 500, 900, 999])
    w = rng.normal(size=(4, 3)).astype(np.float32)
    key = jax.random.key(3)

    def logits_fn(x_t, t_model):
        return x_t.reshape(x_t.shape[0], -1) @ w + 0.001 * t_model[:, None]

    terms = classifier_guidance.classifier_losses(
        s, logits_fn, jnp.asarray(x0), jnp.asarray(labels), jnp.asarray(t), key
    )
    noise = np.asarray(jax.random.normal(key, x0.shape), np.float64)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    logits = x_t.reshape(6, -1) @ w + 0.001 * t[:, None]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(terms["loss"], -log_probs[np.arange(6), labels], rtol=1e-4)
    np.testing.assert_array_equal(terms["accuracy"], logits.argmax(1) == labels)


def _toy_batch(n, seed):
    """Class 0: horizontal stripes (every other row bright); class 1: vertical stripes."""
    labels = np.random.default_rng(seed).integers(0, 2, n).astype(np.int32)
    images = np.zeros((n, 8, 8, 1), np.uint8)
    images[labels == 0, ::2] = 255
    images[labels == 1, :, ::2] = 255
    return jnp.asarray(images), jnp.asarray(labels)


def test_the_classifier_objective_trains_a_noisy_classifier_on_a_toy_problem():
    config = load_config("configs/classifier_digits.py")
    override(
        config,
        {
            "optim.lr": 1e-2,
            "optim.warmup_steps": 0,
            "optim.lr_schedule": "constant",
            "optim.ema_decay": 0.0,
            "training.num_train_steps": 30,
            "training.t_cutoff": 300,
        },
    )
    config.model.update({k: v for k, v in TINY.items() if k not in ("name", "image_size")})
    config.model.update(ch_mult=(1,), attn_resolutions=(), num_groups=2)
    validate_config(config)
    model = models.create_model(training.model_config(config))
    schedule = training.make_schedule(config)
    optimizer, lr = training.make_optimizer(config)
    state = jax.jit(lambda k: training.init_state(model, optimizer, config, k))(jax.random.key(0))
    step = jax.jit(training.make_train_step(model, schedule, config, optimizer, lr))
    losses = []
    for i in range(30):
        images, labels = _toy_batch(64, i)
        state, metrics = step(state, {"image": images, "label": labels}, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    # A zero-initialised head starts at log 2 = 0.693; at t < 300 the stripes stay visible.
    assert abs(losses[0] - np.log(2)) < 1e-3, losses[0]
    # Measured: below 0.01 from step 20 on.
    assert np.mean(losses[-5:]) < 0.1, losses
    loss_fn = training.make_classifier_loss_fn(model, schedule, config)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        loss_fn(state.params, images, jax.random.key(0))


def test_cond_fn_through_the_classifier_is_the_gradient_of_log_p_y():
    model = tiny()
    x, t = inputs()
    params = random_params(model, x, t)
    y = jnp.array([0, 1, 1, 0])
    cond_fn = jax.jit(classifier_guidance.classifier_cond_fn(apply_fn(model), params, 2.5))
    grad = cond_fn(x, t, y, cond_image=None)  # other model kwargs are ignored
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0

    # Against central differences of 2.5 * sum_i log p(y_i | x_i) along a random direction.
    @jax.jit
    def total(x):
        logits = model.apply({"params": params}, x, t)
        return 2.5 * jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    v = jax.random.normal(jax.random.key(5), x.shape)
    h = 1e-2
    fd = (total(x + h * v) - total(x - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * v), fd, rtol=2e-2)
    # Row i's gradient depends on row i only: the batch sum does not mix rows.
    others = cond_fn(x.at[1:].set(-x[1:]), t, y)
    np.testing.assert_allclose(others[0], grad[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(others[1:], grad[1:])
    # With t_cutoff, no gradient where the classifier was not trained.
    cut = jax.jit(
        classifier_guidance.classifier_cond_fn(apply_fn(model), params, 2.5, t_cutoff=300)
    )
    np.testing.assert_array_equal(cut(x, t, y)[2:], 0.0)  # t = 500, 750
    np.testing.assert_array_equal(cut(x, t, y)[:2], grad[:2])


def test_guided_chain_through_the_classifier_compiles_once_for_every_scale():
    model = tiny()
    x, t = inputs()
    params = random_params(model, x, t)
    padded = samplers.prepare_schedule(schedules.make_schedule("linear", 1000), 5, "ddim")
    eps_fn = lambda x_t, t, y: 0.1 * x_t  # an unconditional denoiser takes and ignores y

    @jax.jit
    def run(scale):
        cond_fn = classifier_guidance.classifier_cond_fn(apply_fn(model), params, scale)
        return samplers.run_chain(
            eps_fn,
            padded,
            5,
            x,
            jax.random.key(0),
            sampler="ddim",
            model_kwargs={"y": jnp.array([0, 1, 1, 0])},
            cond_fn=cond_fn,
        )["sample"]

    a, b, c = run(0.0), run(1.0), run(3.0)
    assert run._cache_size() == 1
    assert a.shape == x.shape and bool(jnp.all(jnp.isfinite(c)))
    assert not np.allclose(a, b) and not np.allclose(b, c)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"training.objective": "regression"}, "training.objective='regression'"),
        ({"training.t_cutoff": 2000}, "training.t_cutoff=2000"),
        ({"training.t_cutoff": -1}, "training.t_cutoff=-1"),
    ],
)
def test_bad_classifier_configs_are_one_clear_error(overrides, match):
    config = load_config("configs/classifier_digits.py")
    validate_config(config)
    with pytest.raises(ConfigError, match=match):
        validate_config(override(config, overrides))


def test_an_objective_refuses_a_model_it_does_not_train():
    config = load_config("configs/ddpm_digits.py:short")
    config.training.objective = "classifier"
    with pytest.raises(
        ConfigError,
        match="model.name='unet' is invalid: expected one of "
        "'classifier' for training.objective='classifier'",
    ):
        validate_config(config)


def _classifier_workdir(path, **overrides):
    config = load_config("configs/classifier_digits.py")
    override(config, overrides)
    config.model.update(
        {k: v for k, v in TINY.items() if k not in ("name", "image_size", "in_channels")}
    )
    model = models.create_model(training.model_config(config))
    optimizer, _ = training.make_optimizer(config)
    state = training.new_state(random_params(*_init_args(model)), optimizer)
    workdir_lib.write_config(path, config)
    ckpt = checkpointing.Checkpointer(path / workdir_lib.CHECKPOINT_DIR)
    ckpt.save(7, state)
    ckpt.close()
    return model, state


def _init_args(model):
    x = jnp.zeros((1, model.image_size, model.image_size, model.in_channels))
    return model, x, jnp.zeros((1,), jnp.int32)


def test_load_classifier_returns_the_ema_classifier_and_refuses_another_image_size(tmp_path):
    _, state = _classifier_workdir(tmp_path / "clf")
    digits = load_config("configs/ddpm_digits.py:short")
    apply, params, config = workdir_lib.load_classifier(tmp_path / "clf", digits)
    assert config.training.objective == "classifier"
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(got, want)
    x, t = inputs()
    assert jax.jit(apply)(params, x, t).shape == (4, 2)
    for field, value in [
        ("data.image_size", 16),
        ("data.num_channels", 3),
        ("diffusion.num_timesteps", 500),
        ("diffusion.schedule", "cosine"),
    ]:
        other = override(load_config("configs/ddpm_digits.py:short"), {field: value})
        with pytest.raises(UserError, match=f"trained with config.{field}="):
            workdir_lib.load_classifier(tmp_path / "clf", other)
    conditional = load_config("configs/ddpm_digits.py:short")
    conditional.model.num_classes = 3
    with pytest.raises(
        UserError, match="has 2 classes but the diffusion model has model.num_classes=3"
    ):
        workdir_lib.load_classifier(tmp_path / "clf", conditional)


def test_a_classifier_workdir_is_not_loaded_as_a_diffusion_model(tmp_path):
    workdir_lib.write_config(tmp_path, load_config("configs/classifier_digits.py"))
    with pytest.raises(
        UserError, match="training.objective='classifier', not a diffusion or regression model"
    ):
        workdir_lib.load_workdir(tmp_path)


def test_load_classifier_refuses_a_diffusion_workdir_before_reading_checkpoints(tmp_path):
    # A diffusion workdir without checkpoints.
    workdir_lib.write_config(tmp_path, load_config("configs/ddpm_digits.py:short"))
    with pytest.raises(UserError, match="training.objective='diffusion', not 'classifier'"):
        workdir_lib.load_classifier(tmp_path)
    workdir_lib.write_config(tmp_path, load_config("configs/classifier_digits.py"))
    small = override(load_config("configs/ddpm_digits.py:short"), {"data.image_size": 16})
    with pytest.raises(UserError, match="data.image_size=8 but the diffusion model has 16"):
        workdir_lib.load_classifier(tmp_path, small)
    with pytest.raises(UserError, match="no checkpoint"):
        workdir_lib.load_classifier(
            tmp_path, config_dict.ConfigDict(load_config("configs/ddpm_digits.py:short").to_dict())
        )
