"""Cross-implementation: schedules, one DDIM step and whole DDPM, DDIM and DPM-Solver++(2M)
chains against diffusers' schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, schedules

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(
    "name, theirs",
    [
        ("linear", "linear"),
        ("quadratic", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
        ("sigmoid", "sigmoid"),
    ],
)
def test_schedules_equal_ddpm_scheduler(name, theirs):
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=theirs
    )
    s = schedules.make_schedule(name, 1000)
    # diffusers builds in float32 torch; ours in float64 then rounds: ~1e-6 relative apart,
    # more for cosine's capped betas near 1, where float32 1 - beta loses digits.
    np.testing.assert_allclose(s.betas, ref.betas.numpy(), rtol=2e-6)
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-9)
    their_var = np.array([float(ref._get_variance(t)) for t in range(1, 1000)])
    # diffusers forms 1 - alpha_bar in float32: at small t (1 - alpha_bar ~ 1e-4) that costs
    # ~6e-8 / 1e-4 = 6e-4 relative; ours is computed in float64.
    np.testing.assert_allclose(s.posterior_variance[1:], their_var, rtol=1e-3)


@pytest.mark.parametrize("clip", [False, True])
def test_one_ddim_step_equals_ddim_scheduler(clip):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    ref.set_timesteps(10)  # "leading" spacing: 900, 800, ..., 0
    kept = np.sort(ref.timesteps.numpy())
    s = schedules.respace(schedules.make_schedule("linear", 1000), kept)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    for index in [9, 5, 0]:
        timestep = int(kept[index])
        want = (
            ref.step(
                torch.from_numpy(eps.transpose(0, 3, 1, 2)),
                timestep,
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                eta=0.0,
                use_clipped_model_output=True,
            )
            .prev_sample.numpy()
            .transpose(0, 2, 3, 1)
        )
        got, _, _ = samplers.ddim_step(
            s,
            jnp.asarray(eps),
            jnp.asarray(x),
            jnp.full((2,), index),
            jnp.zeros_like(x),
            eta=0.0,
            clip_denoised=clip,
        )
        # float32 both sides; x_0 = (x - sqrt(1-abar) eps) / sqrt(abar) amplifies by 1/sqrt(abar).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# Whole chains, step by step, against diffusers' schedulers driven by the same model and noise.
MU, SD = 0.3, 0.5
SHAPE = (4, 4, 4, 3)
T = 1000
ATOL = 5e-5  # float32 chains against float32 diffusers (see the DPM-Solver test)


def _model():
    """denoise_fn(x_t, t) of the original timestep t: the optimal eps-predictor of data
    N(mu_t, SD^2) (tests/gaussian_data.py) with a mean mu_t = MU + 0.5 sin(t / 10) that moves
    with t, so a chain that tells the model a wrong t drifts visibly. t is clipped to [0, T) so
    that a wrong t gives a wrong number, not NaN."""
    abar_table = schedules.make_schedule("linear", T).alphas_cumprod

    def denoise_fn(x_t, t):
        t = jnp.clip(t, 0, T - 1)
        abar = jnp.take(abar_table, t).reshape(-1, 1, 1, 1)
        mu = (MU + 0.5 * jnp.sin(t / 10.0)).reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - abar) / (abar * SD**2 + 1 - abar) * (x_t - jnp.sqrt(abar) * mu)

    return denoise_fn


def _their(model, x, timestep):
    """The model's output for diffusers: the same function on the same float32 values."""
    t = jnp.full((x.shape[0],), int(timestep), jnp.int32)
    return torch.from_numpy(np.array(model(jnp.asarray(x.numpy()), t)))


def _our_chain(s, num_steps, x_T, key, **kwargs):
    out = samplers.run_chain(
        _model(), s, num_steps, jnp.asarray(x_T), key, intermediates_every=1, **kwargs
    )
    return np.asarray(out["x_t"][:num_steps])


def _step_noise(key, index):
    """The noise run_chain draws at chain index `index` (a writable copy, for torch)."""
    return np.array(
        samplers.per_sample_normal(jax.random.fold_in(key, index), jnp.arange(SHAPE[0]), SHAPE)
    )


def _x_T():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize(
    "sampler, algorithm",
    [("dpm_solver++2m", "dpmsolver++"), ("sde_dpm_solver++2m", "sde-dpmsolver++")],
)
@pytest.mark.parametrize("num_steps", [5, 10, 20])
def test_dpm_solver_2m_chain_equals_dpm_solver_multistep_scheduler(num_steps, sampler, algorithm):
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type=algorithm,
    )  # defaults: order 2, midpoint, lower_order_final, final sigma 0, linspace
    ref.set_timesteps(num_steps)
    kept = samplers.dpm_solver_timesteps(T, num_steps)
    np.testing.assert_array_equal(ref.timesteps.numpy(), kept[::-1])
    s = schedules.make_schedule("linear", T)
    padded = samplers.prepare_schedule(s, num_steps, sampler)
    x_T = _x_T()
    key = jax.random.key(0)
    ours = _our_chain(padded, num_steps, x_T, key, sampler=sampler, clip_denoised=False)
    model, x = _model(), torch.from_numpy(x_T)
    for i, timestep in enumerate(ref.timesteps):
        # The SDE form's noise: ours of the same chain index, handed to diffusers' step.
        noise = torch.from_numpy(_step_noise(key, num_steps - 1 - i))
        x = ref.step(_their(model, x, timestep), timestep, x, variance_noise=noise).prev_sample
        # float32 both sides; diffusers' alpha_bar is a float32 cumprod (up to 1e-4 relative
        # off ours, built in float64), and x_0 = (x - sigma eps) / alpha amplifies rounding by
        # up to 1 / alpha_T = 160: measured 2e-6 at worst here, 5e-6 over the DDPM and DDIM
        # chains below. 5e-5 is 10x that and far below what a wrong coefficient or timestep
        # costs (told t + 3, every chain here fails by 2e-4 to 3e-3 at its first bad step; DDIM's
        # sigma x sqrt(2) at eta = 0.5 by 0.3).
        np.testing.assert_allclose(ours[i], x.numpy(), atol=ATOL, err_msg=f"step {i}")


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("num_steps", [50, 10])
def test_respaced_ddpm_chain_equals_ddpm_scheduler(num_steps, var_type, monkeypatch):
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=var_type,
        clip_sample=True,
    )
    kept = schedules.space_timesteps(T, num_steps)
    ref.set_timesteps(timesteps=kept[::-1].tolist())
    padded = samplers.prepare_schedule(schedules.make_schedule("linear", T), num_steps)
    x_T, key = _x_T(), jax.random.key(1)
    ours = _our_chain(padded, num_steps, x_T, key, sampler="ddpm", var_type=var_type)
    # diffusers draws its step noise inside step(): hand it ours, chain index n at timestep
    # kept[n].
    noises = iter(torch.from_numpy(_step_noise(key, n)) for n in range(num_steps - 1, -1, -1))
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises)
    )
    model, x = _model(), torch.from_numpy(x_T)
    for i, timestep in enumerate(ref.timesteps):
        x = ref.step(_their(model, x, timestep), timestep, x).prev_sample
        np.testing.assert_allclose(ours[i], x.numpy(), atol=ATOL, err_msg=f"step {i}")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [50, 10])
def test_respaced_ddim_chain_equals_ddim_scheduler(num_steps, eta):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    # DDIMScheduler steps from t to t - T // num_steps, so it needs its "leading" spacing
    # (0, T / n, 2 T / n, ...): our chain runs on the same kept steps.
    ref.set_timesteps(num_steps)
    kept = np.sort(ref.timesteps.numpy())
    s = schedules.respace(schedules.make_schedule("linear", T), kept)
    x_T, key = _x_T(), jax.random.key(2)
    ours = _our_chain(s, num_steps, x_T, key, sampler="ddim", eta=eta)
    model, x = _model(), torch.from_numpy(x_T)
    for i, timestep in enumerate(ref.timesteps):
        noise = torch.from_numpy(_step_noise(key, num_steps - 1 - i))
        x = ref.step(
            _their(model, x, timestep),
            timestep,
            x,
            eta=eta,
            use_clipped_model_output=True,
            variance_noise=noise,
        ).prev_sample
        np.testing.assert_allclose(ours[i], x.numpy(), atol=ATOL, err_msg=f"step {i}")
