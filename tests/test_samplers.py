"""Samplers with the optimal denoiser of Gaussian data must reproduce the data distribution."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from gaussian_data import optimal_eps_fn
from jax.sharding import Mesh

from diffusion_jax import diffusion, generate, parallel, samplers, schedules

MU, SD = 0.3, 0.5
SHAPE = (4096, 2, 2, 1)  # 16,384 independent scalars: standard error of the std ~0.3%


@pytest.fixture(scope="module")
def s():
    return schedules.make_schedule("linear", 1000)


@pytest.fixture(scope="module")
def eps_fn(s):
    return optimal_eps_fn(s, MU, SD)


def _assert_gaussian(x, mu, sd, rel):
    x = np.asarray(x)
    assert abs(x.mean() - mu) < rel * sd, (x.mean(), mu)
    assert abs(x.std() / sd - 1) < rel, (x.std(), sd)


def test_ddpm_reproduces_the_data_distribution(s, eps_fn):
    x = jax.jit(
        lambda k: samplers.ddpm_sample(
            eps_fn, s, SHAPE, k, var_type="fixed_large", clip_denoised=False
        )
    )(jax.random.key(0))
    # Sampling error ~0.3%, the fixed variance's bias ~1%: 3%.
    _assert_gaussian(x, MU, SD, 0.03)


def test_ddim_1000_steps_reproduces_the_data_distribution(s, eps_fn):
    x = jax.jit(
        lambda k: samplers.ddim_sample(eps_fn, s, SHAPE, k, num_steps=1000, clip_denoised=False)
    )(jax.random.key(1))
    _assert_gaussian(x, MU, SD, 0.03)


def test_sde_dpm_solver_2m_converges_to_the_data_distribution(s, eps_fn):
    """SDE-DPM-Solver++(2M) with the exact eps of N(MU, SD^2): at 200 steps (measured: std
    0.502, 2.2% high at 50 steps, 4% low at 20) the sampling error ~0.3% and the
    discretisation's ~0.5% leave it within 2% of the data; its exact coefficients are pinned by
    tests/test_interop_schedulers.py against diffusers."""
    x = samplers.sample(
        eps_fn,
        s,
        SHAPE,
        jax.random.key(3),
        sampler="sde_dpm_solver++2m",
        num_steps=200,
        clip_denoised=False,
    )
    _assert_gaussian(x, MU, SD, 0.02)


def test_ddim_eta_one_equals_ddpm_with_posterior_variance_on_the_same_steps(s, eps_fn):
    kw = dict(num_steps=50, clip_denoised=False)
    key = jax.random.key(2)
    a = samplers.ddim_sample(eps_fn, s, (8, 2, 2, 1), key, eta=1.0, **kw)
    b = samplers.ddpm_sample(eps_fn, s, (8, 2, 2, 1), key, var_type="fixed_small", **kw)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_ddim_is_deterministic_and_stays_close_with_few_steps(s, eps_fn):
    key = jax.random.key(3)
    a = samplers.ddim_sample(eps_fn, s, SHAPE, key, num_steps=100, clip_denoised=False)
    b = samplers.ddim_sample(eps_fn, s, SHAPE, key, num_steps=100, clip_denoised=False)
    np.testing.assert_array_equal(a, b)
    _assert_gaussian(a, MU, SD, 0.06)


def test_one_compiled_chain_serves_every_step_count(s, eps_fn):
    traces = []

    def chain(padded, n, x_T, key, eta):
        traces.append(1)
        return samplers.run_chain(eps_fn, padded, n, x_T, key, sampler="ddim", eta=eta)["sample"]

    fn = jax.jit(chain)
    x_T = jax.random.normal(jax.random.key(4), (4, 2, 2, 1))
    for n, eta in [(10, 0.0), (37, 0.5), (1000, 1.0)]:
        got = fn(samplers.prepare_schedule(s, n), n, x_T, jax.random.key(5), eta)
        want = samplers.run_chain(
            eps_fn,
            samplers.prepare_schedule(s, n),
            n,
            x_T,
            jax.random.key(5),
            sampler="ddim",
            eta=eta,
        )["sample"]
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(traces) == 1


def test_intermediates_and_progress(s, eps_fn):
    seen = []
    out = samplers.ddpm_sample(
        eps_fn,
        s,
        (2, 2, 2, 1),
        jax.random.key(6),
        num_steps=10,
        intermediates_every=4,
        progress_fn=lambda i, n: seen.append((int(i), int(n))),
    )
    jax.effects_barrier()
    assert out["x_t"].shape == (3, 2, 2, 2, 1) and out["pred_x0"].shape == (3, 2, 2, 2, 1)
    assert seen == [(i, 10) for i in range(1, 11)]
    np.testing.assert_array_equal(out["x_t"][-1], np.zeros((2, 2, 2, 1)))  # only 2 full blocks of 4
    assert np.all(np.asarray(out["x_t"][:2]) != 0)


def test_progress_is_reported_about_fifty_times_and_after_the_last_step(s, eps_fn, monkeypatch):
    """A host callback per step costs (README); long chains report every total // 50 steps."""
    seen = []
    samplers.ddim_sample(
        eps_fn,
        s,
        (1, 2, 2, 1),
        jax.random.key(8),
        num_steps=103,
        progress_fn=lambda i, n: seen.append((int(i), int(n))),
    )
    jax.effects_barrier()
    assert seen == [(i, 103) for i in range(2, 103, 2)] + [(103, 103)]

    bars = []

    class Bar:  # records what tqdm_progress does to its bars
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    update = samplers.tqdm_progress("test")
    for i, n in seen:
        update(i, n)
    update(2, 103)  # a second chain starts a new bar
    assert [(b.total, b.n, b.closed) for b in bars] == [(103, 103, True), (103, 2, False)]


def test_ddim_inversion_round_trips(s, eps_fn):
    x0 = MU + SD * jax.random.normal(jax.random.key(7), SHAPE)
    run = jax.jit(lambda x: samplers.ddim_invert(eps_fn, s, x, num_steps=1000))
    x_T = run(x0)
    # The encoding of data is standard normal ...
    _assert_gaussian(x_T, 0.0, 1.0, 0.03)
    # ... and decoding it with the same deterministic chain gives the data back.
    padded = samplers.prepare_schedule(s, 1000)
    back = samplers.run_chain(
        eps_fn, padded, 1000, x_T, jax.random.key(0), sampler="ddim", clip_denoised=False
    )
    # Discretisation error of the two 1000-step ODE solves: measured ~1e-3 of the data scale.
    assert float(jnp.max(jnp.abs(back["sample"] - x0))) < 0.02


def test_slerp_ends_and_norm():
    z0 = jax.random.normal(jax.random.key(8), (3, 4, 4, 2))
    z1 = jax.random.normal(jax.random.key(9), (3, 4, 4, 2))
    np.testing.assert_allclose(samplers.slerp(z0, z1, 0.0), z0, atol=1e-5)
    np.testing.assert_allclose(samplers.slerp(z0, z1, 1.0), z1, atol=1e-5)
    mid = samplers.slerp(z0, z1, 0.5)
    # Between two latents of similar norm the path keeps the norm (unlike linear interpolation).
    n0, n1, nm = (float(jnp.linalg.norm(z[0])) for z in (z0, z1, mid))
    assert min(n0, n1) * 0.9 < nm < max(n0, n1) * 1.1


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda s, f: samplers.ddim_sample(
                f, s, (2, 2, 2, 1), jax.random.key(0), num_steps=1001
            ),
            "num_steps",
        ),
        (
            lambda s, f: samplers.ddim_sample(
                f, s, (2, 2, 2, 1), jax.random.key(0), num_steps=10, eta=-0.1
            ),
            "eta",
        ),
        (lambda s, f: samplers.ddpm_sample(f, s, (2, 2, 2), jax.random.key(0)), "shape"),
        (
            lambda s, f: samplers.ddpm_sample(
                f, s, (2, 2, 2, 1), jax.random.key(0), parameterization="score"
            ),
            "parameterization",
        ),
        (
            lambda s, f: samplers.ddpm_sample(
                f, s, (2, 2, 2, 1), jax.random.key(0), var_type="learned"
            ),
            "var_type",
        ),
        (
            lambda s, f: samplers.run_chain(
                f, s, 3, jnp.zeros((1, 2, 2, 1)), jax.random.key(0), sampler="euler"
            ),
            "sampler",
        ),
    ],
)
def test_bad_input_is_a_clear_error(s, eps_fn, call, match):
    with pytest.raises(ValueError, match=match):
        call(s, eps_fn)


def test_ddpm_step_adds_no_noise_at_the_last_step(s):
    x = jnp.ones((2, 1, 1, 1))
    out = jnp.zeros_like(x)
    noise = jnp.full_like(x, 10.0)
    a, _, _ = samplers.ddpm_step(s, out, x, jnp.array([0, 0]), noise)
    b, _, _ = samplers.ddpm_step(s, out, x, jnp.array([0, 0]), 0 * noise)
    np.testing.assert_array_equal(a, b)
    mean = diffusion.p_mean_variance(s, out, x, jnp.array([0, 0]))["mean"]
    np.testing.assert_allclose(a, mean)


def test_dpm_solver_2m_follows_the_exact_ode_of_gaussian_data(s, eps_fn):
    """For N(mu, sd^2) data the probability-flow ODE keeps z = (x_t - sqrt(abar_t) mu) /
    sqrt(abar_t sd^2 + 1 - abar_t) constant. DPM-Solver++(2M) integrates it from x_T to the
    last kept index t_1 and ends with the first-order step to abar = 1, which returns the
    optimal pred_x0 = E[x_0 | x_{t_1}] = mu + sd^2 sqrt(a) / sqrt(a sd^2 + 1 - a) z, a = abar_{t_1}
    (float64 closed form)."""
    x_T = jax.random.normal(jax.random.key(10), SHAPE)
    abar = np.cumprod(1.0 - np.asarray(s.betas, np.float64))
    z = (np.asarray(x_T, np.float64) - np.sqrt(abar[-1]) * MU) / np.sqrt(
        abar[-1] * SD**2 + 1 - abar[-1]
    )
    padded = samplers.prepare_schedule(s, 20, "dpm_solver++2m")
    x = samplers.run_chain(
        eps_fn, padded, 20, x_T, jax.random.key(0), sampler="dpm_solver++2m", clip_denoised=False
    )["sample"]
    x = np.asarray(x, np.float64)
    t_1 = samplers.dpm_solver_timesteps(s.num_timesteps, 20)[0]
    a = abar[t_1]
    shrink = SD * np.sqrt(a) / np.sqrt(a * SD**2 + 1 - a)  # 0.943 at t_1 = 50
    # Discretisation error only (the denoiser is exact): measured 0.020 at worst over the
    # 16,384 values (|z| up to 4), 0.15 for the first-order DDIM on the same steps.
    np.testing.assert_allclose(x, MU + SD * shrink * z, atol=0.03)
    # The data's moments, with the last step's shrinkage of the std. 16,384 draws: the mean's
    # standard error is 0.8% of that std, the std's 0.6%; 3% is 4 of them.
    _assert_gaussian(x, MU, SD * shrink, 0.03)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_eq_12_in_float64(s, eta):
    """One DDIM step on a respaced schedule against Song et al. eqs. 12 and 16 written out in
    float64 numpy from alpha_bar alone, noise included."""
    kept = schedules.space_timesteps(1000, 10)
    sub = schedules.respace(s, kept)
    abar = np.cumprod(1.0 - np.asarray(s.betas, np.float64))[kept]
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((2, 2, 2, 1)).astype(np.float32) for _ in range(3))
    for index in (9, 4, 1):
        a, a_prev = abar[index], abar[index - 1]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        want = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
        t = jnp.full((2,), index)
        got, _, _ = samplers.ddim_step(sub, eps, x, t, z, eta=eta, clip_denoised=False)
        # float32 tables and arithmetic: x_0 amplifies rounding by 1 / sqrt(abar) <= 160,
        # measured 2e-6 at worst.
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"index {index}")


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_every_chain_tells_the_model_the_kept_timesteps_in_order(s, sampler):
    seen = []

    def denoise_fn(x_t, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t, ordered=True)
        return jnp.zeros_like(x_t)

    samplers.sample(denoise_fn, s, (2, 1, 1, 1), jax.random.key(0), sampler=sampler, num_steps=7)
    jax.effects_barrier()
    kept = samplers.SAMPLERS[sampler].timesteps(1000, 7)
    np.testing.assert_array_equal(np.stack(seen), np.repeat(kept[::-1, None], 2, axis=1))


class _GaussianModel:
    """A stand-in for a Flax model in generate.make_sampler: apply() is the optimal denoiser."""

    def __init__(self, eps_fn):
        self.eps_fn, self.traces = eps_fn, 0

    def apply(self, variables, x_t, t, train):
        del variables, train
        self.traces += 1  # apply runs only while the chain is traced
        return self.eps_fn(x_t, t)


@pytest.mark.parametrize(
    "sampler, eta",
    [("ddpm", 0.0), ("ddim", 0.5), ("dpm_solver++2m", 0.0), ("sde_dpm_solver++2m", 0.0)],
)
def test_sample_i_is_the_same_at_any_batch_size_and_device_count(s, eps_fn, sampler, eta):
    config = ml_collections.ConfigDict(
        dict(
            data=dict(image_size=4, num_channels=1),
            model=dict(num_classes=0),
            diffusion=dict(parameterization="eps", var_type="fixed_large"),
            sampling=dict(sampler=sampler, steps=10, eta=eta, clip_denoised=True, batch_size=8),
        )
    )
    model, key = _GaussianModel(eps_fn), jax.random.key(0)
    one = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
    eight = parallel.make_mesh()
    assert eight.devices.size == 8  # tests/conftest.py emulates 8 devices

    def images(mesh, batch_size):
        sample = generate.make_sampler(model, s, config, mesh)
        before = model.traces
        out = sample({}, key, 8, batch_size=batch_size)
        assert model.traces == before + 1  # one compile serves every batch
        return out

    want = images(one, 8)
    # Batches of 4 and of 3 (the last one padded with a ninth sample), on one device, and
    # batches of 8 split over 8 devices: the same per-sample keys, the same uint8 images.
    for mesh, batch_size in [(one, 4), (one, 3), (eight, 8)]:
        np.testing.assert_array_equal(images(mesh, batch_size), want, err_msg=str(batch_size))
    assert len(np.unique(want.reshape(8, -1), axis=0)) == 8  # the samples differ


def test_grad_through_a_whole_ddim_chain_matches_finite_differences():
    """jax.grad through a 20-step DDIM chain (eta 0, x_T fixed) of the exact eps-predictor of
    N(mu, s^2) data, with respect to mu and s: against central differences of the same chain.
    The chain is smooth in (mu, s) and its output O(1), so in float32 at h = 1e-2 the truncation
    error is ~h^2 |f'''| / 6 ~ 2e-5 and the rounding ~u |f| / h ~ 1e-5 of the gradient; a dropped
    step's contribution or a stop-gradient in the loop changes it by O(1/20) or more, so the
    bound is 2e-3 relative. A Python-int step count makes the loop a scan (checked), which
    reverse-mode autodiff differentiates; a traced one would be a while loop, which it cannot."""
    s = schedules.make_schedule("linear", num_timesteps=1000)
    key = jax.random.key(0)

    def chain_mean_square(theta):
        denoise_fn = optimal_eps_fn(s, theta[0], theta[1])
        x = samplers.ddim_sample(
            denoise_fn, s, (64, 4, 4, 1), key, num_steps=20, eta=0.0, clip_denoised=False
        )
        return jnp.mean(x) + jnp.mean(jnp.square(x))

    theta = jnp.array([0.3, 0.5])
    grad = np.asarray(jax.grad(chain_mean_square)(theta), np.float64)
    h = 1e-2
    fd = np.array(
        [
            (chain_mean_square(theta + h * e) - chain_mean_square(theta - h * e)) / (2 * h)
            for e in np.eye(2, dtype=np.float32)
        ],
        np.float64,
    )
    np.testing.assert_allclose(grad, fd, rtol=2e-3)
    # d/ds of E[x^2] for samples of N(mu, s^2) is about 2 s: the chain reproduces the data.
    assert abs(grad[1] - 2 * 0.5) < 0.2
    padded = samplers.prepare_schedule(s, 20, "ddim")
    x_T = jax.random.normal(key, (2, 4, 4, 1))

    def run(theta):
        out = samplers.run_chain(
            optimal_eps_fn(padded, theta[0], theta[1]),
            padded,
            20,
            x_T,
            key,
            sampler="ddim",
            clip_denoised=False,
        )
        return jnp.mean(out["sample"])

    jaxpr = str(jax.make_jaxpr(jax.grad(run))(theta))
    assert "scan" in jaxpr and "while" not in jaxpr
