"""Cross-implementation: schedules and one DDIM step against diffusers' schedulers."""

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
