"""Classifier guidance (Dhariwal & Nichol 2021) checked in closed form on a Gaussian mixture.

Data: two isotropic 2-D Gaussians (weights 0.7 / 0.3). The denoiser is the mixture's exact
E[eps | x_t] and the classifier its exact p(k | x_t) (tests/gaussian_data.py). Since
grad log p(y | x_t) = grad log p(x_t | y) - grad log p(x_t), Alg. 2's eps - sqrt(1 - abar_t)
grad log p(y | x_t) at scale 1 is exactly the eps of component y alone: eps-form chains must
equal the chains of that component's own exact denoiser, sample for sample, and the DDPM chain
(Alg. 1, a first-order shift of the mean) must sample that component.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import mixture_cond_fn, mixture_eps_fn, mixture_log_posterior

from diffusion_jax import diffusion, samplers, schedules

WEIGHTS = (0.7, 0.3)
MEANS = np.array([[-0.5, -0.5], [0.4, 0.4]])
SDS = (0.15, 0.25)
N = 4000  # rows; the first half is guided to component 0, the second to component 1
SHAPE = (N, 1, 1, 2)


@pytest.fixture(scope="module")
def s():
    return schedules.make_schedule("linear", 1000)


def _labels(n):
    return jnp.repeat(jnp.arange(2, dtype=jnp.int32), n // 2)


def _chain(s, denoise_fn, sampler, steps, *, cond_fn=None, eta=0.0, n=N):
    """A jitted chain from the same x_T and noise key for every call; model_kwargs y holds the
    labels of _labels(n)."""
    padded = samplers.prepare_schedule(s, steps, sampler)
    x_T = jax.random.normal(jax.random.key(1), (n,) + SHAPE[1:])

    def run(x_T):
        return samplers.run_chain(
            denoise_fn,
            padded,
            steps,
            x_T,
            jax.random.key(2),
            sampler=sampler,
            eta=eta,
            clip_denoised=False,
            model_kwargs={"y": _labels(n)},
            cond_fn=cond_fn,
        )["sample"]

    return np.asarray(jax.jit(run)(x_T))


def _conditional_eps(s):
    """The exact eps of component y alone, row by row."""
    alone = [mixture_eps_fn(s, (1.0,), MEANS[k : k + 1], SDS[k : k + 1]) for k in (0, 1)]

    def denoise_fn(x_t, t, y):
        pick = (y == 0).reshape(-1, 1, 1, 1)
        return jnp.where(pick, alone[0](x_t, t), alone[1](x_t, t))

    return denoise_fn


def _guided(s, sampler, steps, scale=1.0, **kwargs):
    return _chain(
        s,
        mixture_eps_fn(s, WEIGHTS, MEANS, SDS),
        sampler,
        steps,
        cond_fn=mixture_cond_fn(s, WEIGHTS, MEANS, SDS, scale),
        **kwargs,
    )


@pytest.mark.parametrize(
    "sampler, steps, eta", [("ddim", 50, 0.0), ("ddim", 50, 1.0), ("dpm_solver++2m", 20, 0.0)]
)
def test_eps_form_at_scale_1_equals_the_chain_of_the_chosen_component(s, sampler, steps, eta):
    guided = _guided(s, sampler, steps, eta=eta, n=1000)
    alone = _chain(s, _conditional_eps(s), sampler, steps, eta=eta, n=1000)
    # Equal in exact arithmetic; float32 rounding of the two routes measured at most 1.3e-6.
    np.testing.assert_allclose(guided, alone, atol=2e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_1000_step_chains_at_scale_1_sample_the_chosen_component(s, sampler):
    guided = _guided(s, sampler, 1000)
    for k, rows in enumerate(np.split(guided, 2)):
        x, mu, sd = rows.ravel(), MEANS[k, 0], SDS[k]
        # 4,000 scalars per component: standard errors 1.6% of sd (mean) and 1.1% (std);
        # the 1000-step chain and the fixed variance add about 1% (tests/test_samplers.py).
        assert abs(x.mean() - mu) < 0.06 * sd, (k, x.mean(), mu)
        assert abs(x.std() / sd - 1) < 0.06, (k, x.std(), sd)
    if sampler == "ddpm":
        # Sample for sample against the exact conditional chain: Alg. 1's first-order shift of
        # the mean differed from it by at most 0.0024.
        alone = _chain(s, _conditional_eps(s), sampler, 1000)
        np.testing.assert_allclose(guided, alone, atol=0.01)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_a_zero_gradient_leaves_every_step_unchanged_bit_for_bit(s, sampler):
    """Eagerly, op by op: a guided step with grad 0 computes the unguided step's numbers."""
    method = samplers.SAMPLERS[sampler]
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.normal(size=(5, 2, 2, 1)), jnp.float32)
    output = jnp.asarray(rng.normal(size=(5, 2, 2, 1)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(5, 2, 2, 1)), jnp.float32)
    t = jnp.array([0, 1, 10, 500, 999])
    state = method.init_state(x_t)
    options = dict(eta=0.5, parameterization="eps", var_type="fixed_large", clip_denoised=True)
    plain = method.step(s, output, x_t, t, noise, state, **options)
    guided = method.step(
        s,
        output,
        x_t,
        t,
        noise,
        state,
        **options,
        cond_grad=jnp.zeros_like(x_t),
        guidance_form=method.guidance_form,
    )
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(guided), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_scale_0_chains_equal_unguided_chains(s, sampler):
    eps_fn = mixture_eps_fn(s, WEIGHTS, MEANS, SDS)
    guided = _guided(s, sampler, 30, scale=0.0, n=500)
    plain = _chain(s, eps_fn, sampler, 30, n=500)
    # The arithmetic is the same (previous test); compiled together with the classifier, XLA
    # fuses the denoiser's ops differently and the chain amplifies that rounding (measured at
    # most 6e-6 on samples of size ~1).
    np.testing.assert_allclose(guided, plain, atol=5e-5)


def test_a_positive_scale_moves_samples_toward_the_class_and_a_negative_one_away(s):
    """Fraction of the rows guided to component 1 (prior weight 0.3) that its exact posterior
    at t = 0 assigns to it, against the scale (traced: one compiled chain)."""
    log_p = mixture_log_posterior(s, WEIGHTS, MEANS, SDS)
    eps_fn = mixture_eps_fn(s, WEIGHTS, MEANS, SDS)
    padded = samplers.prepare_schedule(s, 50, "ddim")
    x_T = jax.random.normal(jax.random.key(1), SHAPE)

    @jax.jit
    def fraction(scale):
        x = samplers.run_chain(
            eps_fn,
            padded,
            50,
            x_T,
            jax.random.key(2),
            sampler="ddim",
            clip_denoised=False,
            model_kwargs={"y": _labels(N)},
            cond_fn=mixture_cond_fn(s, WEIGHTS, MEANS, SDS, scale),
        )["sample"][N // 2 :]
        return jnp.mean(jnp.argmax(log_p(x, jnp.zeros((N // 2,), jnp.int32)), -1) == 1)

    scales = (-1.0, 0.0, 0.5, 1.0)
    fractions = [float(fraction(c)) for c in scales]
    # Unguided: the prior weight, binomial standard error 0.01 at 2,000 rows, plus the
    # 50-step discretisation: within 0.03. Measured: 0.04, 0.29, 0.74, 1.0.
    assert abs(fractions[1] - WEIGHTS[1]) < 0.03, fractions
    assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False)), fractions
    assert fractions[-1] > 0.98 and fractions[0] < 0.1, fractions


def test_guidance_forms_equal_algorithms_1_and_2_in_float64(s):
    """The forms on p_mean_variance's dict (v-prediction, clipped, learned variance) against
    Alg. 1 and Alg. 2 written out in numpy float64 from the schedule's betas."""
    rng = np.random.default_rng(0)
    shape = (3, 2, 2, 1)
    x_t = rng.normal(size=shape).astype(np.float32)
    output = rng.normal(size=shape[:-1] + (2,)).astype(np.float32)
    grad = rng.normal(size=shape).astype(np.float32)
    t = jnp.array([0, 40, 900])
    out = diffusion.p_mean_variance(
        s, output, x_t, t, parameterization="v", var_type="learned_range", clip_denoised=True
    )
    mean_form = samplers.condition_mean(s, out, x_t, t, grad)
    eps_form = samplers.condition_score(s, out, x_t, t, grad)

    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)[np.asarray(t)].reshape(-1, 1, 1, 1)
    abar_prev = np.append(1.0, np.cumprod(1 - betas))[np.asarray(t)].reshape(-1, 1, 1, 1)
    beta = betas[np.asarray(t)].reshape(-1, 1, 1, 1)
    variance = np.exp(np.asarray(out["log_variance"], np.float64))
    np.testing.assert_allclose(
        mean_form["mean"], np.asarray(out["mean"]) + variance * grad, rtol=1e-5, atol=1e-6
    )
    x0 = np.asarray(out["pred_x0"], np.float64)  # clipped
    eps = (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    eps_new = eps - np.sqrt(1 - abar) * grad  # Alg. 2
    x0_new = (x_t - np.sqrt(1 - abar) * eps_new) / np.sqrt(abar)
    mean = (
        np.sqrt(abar_prev) * beta / (1 - abar) * x0_new
        + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t
    )
    np.testing.assert_allclose(eps_form["pred_eps"], eps_new, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eps_form["pred_x0"], x0_new, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eps_form["mean"], mean, rtol=1e-4, atol=1e-4)
    assert samplers.SAMPLERS["ddpm"].guidance_form == "mean"
    assert samplers.SAMPLERS["ddim"].guidance_form == "eps"
    assert samplers.SAMPLERS["dpm_solver++2m"].guidance_form == "eps"


def test_a_traced_scale_does_not_recompile(s):
    eps_fn = mixture_eps_fn(s, WEIGHTS, MEANS, SDS)
    padded = samplers.prepare_schedule(s, 10, "ddim")
    x_T = jax.random.normal(jax.random.key(0), (64, 1, 1, 2))

    @jax.jit
    def run(scale):
        cond_fn = mixture_cond_fn(s, WEIGHTS, MEANS, SDS, scale)
        return samplers.run_chain(
            eps_fn,
            padded,
            10,
            x_T,
            jax.random.key(1),
            sampler="ddim",
            clip_denoised=False,
            model_kwargs={"y": jnp.ones((64,), jnp.int32)},
            cond_fn=cond_fn,
        )["sample"]

    a, b = run(0.0), run(2.0)
    assert run._cache_size() == 1
    assert float(jnp.mean(b)) > float(jnp.mean(a)) + 0.1  # toward component 1 at +0.4
