"""model.kernels: one switch between plain Flax layers ("xla") and the CPU kernels ("fast_cpu"),
with "auto" choosing per platform; the same parameters under each, and autodiff in every mode.

Tolerances.
- "xla" against "fast_cpu" outputs: Winograd's float32 rounding is up to 8x a direct
  convolution's (tests/test_conv.py), whose relative error is about sqrt(9 C) u ~ 1.5e-6 at
  C <= 64 (u = 6e-8), so about 1.2e-5 per 3x3 layer; GroupNorm renormalises, so the errors of
  the tiny UNet's ~20 layers add in quadrature rather than grow: sqrt(20) * 1.2e-5 ~ 5e-5.
  The bound is 1e-4 of the output's largest entry (measured: 3-4e-6).
- jvp against reverse mode (<u, J v> both ways) and jacfwd against jacrev: the same derivative in
  float32 with the products summed in other orders, rounding ~ sqrt(n) u relative to the largest
  term; 1e-5 relative to the largest entry.
- jvp against central finite differences in float32, step h: truncation h^2 / 6 |f'''| and
  rounding u |f| / h. At h = 1e-2 the truncation is 1.5e-3 of the largest entry of J v
  (measured); at h = 2e-3 it is 25x less, 6e-5, and the rounding 6e-8 / 2e-3 ~ 3e-5 of |f|, so
  the bound is 1e-3 relative to the largest entry of J v (a wrong sign or a dropped term is O(1)).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet import TINY, random_params  # the tiny UNet the model tests share

from diffusion_jax import diffusion, models, samplers, schedules
from diffusion_jax.models import fast_cpu, layers

ALL = tuple(layers.KERNELS)


def tiny(kernels, **overrides):
    return models.create_model({**TINY, "kernels": kernels, **overrides})


def data(batch=2, seed=0):
    x = jax.random.uniform(jax.random.key(seed), (batch, 8, 8, 3), minval=-1.0, maxval=1.0)
    return x, jnp.array([3, 700][:batch])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_unknown_kernels_value_names_the_allowed_ones():
    with pytest.raises(ValueError, match="kernels='gpu'; allowed: 'auto', 'xla', 'fast_cpu'"):
        tiny("gpu")
    assert set(layers.KERNELS) == {"auto", "xla", "fast_cpu"}


def test_parameter_trees_are_identical_under_every_setting():
    x, t = data()
    # unsafe_rbg compiles several times faster than threefry on CPU; the test needs any key
    key = jax.random.key(0, impl="unsafe_rbg")
    trees = {k: jax.jit(tiny(k).init)(key, x, t)["params"] for k in ALL}
    shapes = {k: jax.tree.map(lambda a: (a.shape, a.dtype), p) for k, p in trees.items()}
    assert shapes["xla"] == shapes["fast_cpu"] == shapes["auto"]
    # the same initialisers under the same names draw the same values
    for k in ("fast_cpu", "auto"):
        jax.tree.map(np.testing.assert_array_equal, trees[k], trees["xla"])
    norm = trees["xla"]["down_blocks_0"]["resnets_0"]["norm1"]
    assert set(norm) == {"scale", "bias"}


@pytest.mark.parametrize(
    "train", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eval", "train_dropout"]
)
def test_same_params_give_the_same_outputs(train):
    """One parameter tree under all three settings, the same dropout rng: the same outputs (and
    so the same dropout masks: one flipped mask element moves the output by O(1))."""
    x, t = data()
    params = random_params(tiny("xla"), x, t)
    rngs = {"dropout": jax.random.key(5)}

    def out(kernels):
        model = tiny(kernels, dropout=0.3)
        return jax.jit(lambda p: model.apply({"params": p}, x, t, train=train, rngs=rngs))(params)

    ref = out("xla")
    for k in ("fast_cpu", "auto"):
        assert rel_err(out(k), ref) < 1e-4, k


@pytest.mark.slow
def test_jvp_and_jacfwd_through_the_unet_with_xla():
    model = tiny("xla")
    x, t = data(batch=1)
    params = random_params(model, x, t)

    f = jax.jit(lambda x: model.apply({"params": params}, x, t))
    v = jax.random.normal(jax.random.key(3), x.shape)
    u = jax.random.normal(jax.random.key(4), x.shape)
    y, jv = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))(x, v)
    (ju,) = jax.vjp(f, x)[1](u)
    # <u, J v> both ways
    assert abs(float(jnp.vdot(u, jv) - jnp.vdot(ju, v))) < 1e-5 * float(jnp.vdot(abs(u), abs(jv)))
    h = 2e-3
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert rel_err(jv, fd) < 1e-3
    jac_fwd, jac_rev = jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(f))(x)
    assert jac_fwd.shape == (*y.shape, *x.shape)
    assert rel_err(jac_fwd, jac_rev) < 1e-5


@pytest.mark.slow
def test_jvp_through_training_losses_with_xla():
    """The directional derivative of the loss in parameter space, forward mode against reverse
    mode and finite differences."""
    model = tiny("xla")
    x0, _ = data()
    params = random_params(model, x0, jnp.array([0, 0]))
    schedule = schedules.make_schedule("linear", num_timesteps=1000)
    t = np.array([10, 600])  # numpy: a constant under jit, for training_losses' check of it

    @jax.jit
    def loss(p):
        def denoise_fn(x_t, t):
            return model.apply({"params": p}, x_t, t)

        out = diffusion.training_losses(schedule, denoise_fn, x0, t, jax.random.key(7))
        return out["loss"].mean()

    dp = jax.tree.map(lambda p: jax.random.normal(jax.random.key(8), p.shape), params)
    value, forward = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(params, dp)
    grads = jax.jit(jax.grad(loss))(params)
    reverse = tree_vdot(grads, dp)
    scale = tree_vdot(jax.tree.map(abs, grads), jax.tree.map(abs, dp))
    assert abs(float(forward - reverse)) < 1e-5 * float(scale)
    # h = 1e-3 along this dense direction left a 4% truncation error (measured); at h = 1e-4 it
    # is 100x less, and the rounding of the O(1) float32 loss, 6e-8 / 1e-4 ~ 6e-4 absolute, is
    # under 1% of the derivative (0.15)
    h = 1e-4
    shift = lambda s: jax.tree.map(lambda p, d: p + s * h * d, params, dp)  # noqa: E731
    fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
    assert abs(float(forward - fd)) < 2e-2 * abs(float(forward)), (forward, fd)
    assert np.isfinite(float(value))


@pytest.mark.parametrize("kernels", [pytest.param("fast_cpu", marks=pytest.mark.slow), "auto"])
def test_forward_mode_through_the_fast_kernels_raises_one_line_naming_the_switch(kernels):
    model = tiny(kernels)
    x, t = data(batch=1)
    params = random_params(model, x, t)

    def f(x):
        return model.apply({"params": params}, x, t)

    attempts = {
        "jvp": lambda: jax.jvp(f, (x,), (x,)),
        "jit(jvp)": lambda: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x),
        "jvp(jit)": lambda: jax.jvp(jax.jit(f), (x,), (x,)),
        "jacfwd": lambda: jax.jacfwd(f)(x),
        "linearize": lambda: jax.linearize(f, x)[1](x),
    }
    for name, attempt in attempts.items():
        with pytest.raises(TypeError) as error:
            attempt()
        message = str(error.value)
        assert message == fast_cpu.FORWARD_MODE_MESSAGE, name
        assert "\n" not in message and "model.kernels='fast_cpu'" in message
        assert "config.model.kernels='xla'" in message


def test_auto_in_bfloat16_is_plain_flax_so_forward_mode_works():
    model = tiny("auto", dtype="bfloat16")
    assert layers.layer_kinds("auto", jnp.bfloat16) is layers.FLAX_LAYERS
    x, t = data(batch=1)
    params = random_params(model, x, t)
    f = lambda x: model.apply({"params": params}, x, t)  # noqa: E731
    _, jv = jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x)
    assert jv.shape == x.shape


@pytest.mark.slow
def test_reverse_mode_is_unchanged_by_the_forward_mode_guard():
    """grad, vmap of grad (per-example gradients) and grad of vmap work with "fast_cpu" and
    agree with each other; the compiled gradient holds Winograd's 36 tile products."""
    model = tiny("fast_cpu")
    x, t = data()
    params = random_params(model, x, t)

    def loss(p, x, t):
        return jnp.sum(model.apply({"params": p}, x[None], t[None]) ** 2)

    per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0, 0)))(params, x, t)
    total = jax.jit(jax.grad(lambda p: jax.vmap(loss, (None, 0, 0))(p, x, t).sum()))(params)
    summed = jax.tree.map(lambda g: g.sum(0), per_example)
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(total), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7
    hlo = jax.jit(jax.grad(loss)).lower(params, x[0], t[0]).compile().as_text()
    assert "[36," in hlo  # the Winograd products, forward and backward


@pytest.mark.slow
def test_grad_through_a_ddim_chain_agrees_between_settings():
    """jax.grad with respect to the model's parameters through a 3-step DDIM chain (a scan), by
    XLA's autodiff ("xla") and by the kernels' VJPs ("fast_cpu"): the directional derivatives
    along a random direction agree to 2% (measured 0.4%: Winograd's rounding, amplified by the
    chain's division by sqrt(alpha_bar) at high noise)."""
    x, t = data()
    params = random_params(tiny("xla"), x, t)
    schedule = schedules.make_schedule("linear", num_timesteps=1000)
    dp = jax.tree.map(lambda p: jax.random.normal(jax.random.key(9), p.shape), params)

    def directional(kernels):
        model = tiny(kernels)

        def sample_mean(p):
            def denoise_fn(x_t, t):
                return model.apply({"params": p}, x_t, t)

            sample = samplers.ddim_sample(
                denoise_fn,
                schedule,
                (2, 8, 8, 3),
                jax.random.key(3),
                num_steps=3,
                clip_denoised=False,
            )
            return jnp.mean(jnp.sin(sample))

        # not jitted as a whole: ddim_sample respaces the schedule on the host; its loop is compiled
        return float(tree_vdot(jax.grad(sample_mean)(params), dp))

    xla, fast = directional("xla"), directional("fast_cpu")
    assert np.isfinite(xla) and xla != 0
    assert abs(fast - xla) < 2e-2 * abs(xla), (fast, xla)


def test_fast_dropout_on_cpu_only_is_flax_dropout_bit_for_bit():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
    rngs = {"dropout": jax.random.key(2)}
    ours = fast_cpu.Dropout(0.3, only_on_cpu=True).apply({}, x, False, rngs=rngs)
    theirs = nn.Dropout(0.3).apply({}, x, False, rngs=rngs)
    np.testing.assert_array_equal(ours, theirs)
