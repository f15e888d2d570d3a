"""Continuous noise-level conditioning (SR3, Saharia et al. 2021; WaveGrad, Chen et al. 2020)
and a sampling schedule separate from the training one.

The closed form: for data x_0 ~ N(mu, s^2) the optimal denoiser told a level gamma is
E[eps | x_gamma] (tests/gaussian_data.py); it knows no schedule, so a chain on another schedule
reproduces the data only if the chain tells it that schedule's levels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from gaussian_data import optimal_eps_of_level_fn
from jax.sharding import Mesh
from train_harness import run_cli, tiny_config

from diffusion_jax import diffusion, generate, models, parallel, samplers, schedules, training
from diffusion_jax.validation import ConfigError, validate_config

MU, SD = 0.3, 0.5
SQRT = "sqrt_alpha_bar"
# The issue's example: train T = 2000, betas linspace(1e-4, 2e-2); sample T = 100, betas
# linspace(1e-4, 0.1), 20x fewer steps.
SR3 = {
    "diffusion.num_timesteps": 2000,
    "diffusion.beta_start": 1e-4,
    "diffusion.beta_end": 2e-2,
    "diffusion.noise_conditioning": SQRT,
    "sampling.schedule.name": "linear",
    "sampling.schedule.num_timesteps": 100,
    "sampling.schedule.beta_start": 1e-4,
    "sampling.schedule.beta_end": 0.1,
    "sampling.steps": 100,
}


def sqrt_alpha_bar(betas) -> np.ndarray:
    """sqrt(alpha_bar_t), t = 1..T, in float64 from the betas."""
    return np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))


def test_the_schedule_configs_express_the_issues_training_and_sampling_schedules():
    config = tiny_config(SR3)
    train, sample = schedules.training_schedule(config), schedules.sampling_schedule(config)
    np.testing.assert_allclose(train.betas, np.linspace(1e-4, 2e-2, 2000), rtol=1e-6)
    np.testing.assert_allclose(sample.betas, np.linspace(1e-4, 0.1, 100), rtol=1e-6)
    # training.make_schedule is the training schedule, beta range included.
    np.testing.assert_array_equal(training.make_schedule(config).betas, train.betas)
    # Name '' is the training schedule: the one given, or built from the config.
    config.sampling.schedule.name = ""
    assert schedules.sampling_schedule(config, train) is train
    np.testing.assert_array_equal(schedules.sampling_schedule(config).betas, train.betas)


def test_the_training_draw_lies_between_adjacent_levels_and_is_uniform():
    """gamma at index t ~ U(sqrt(abar_t), sqrt(abar_{t-1})), with sqrt(abar_0) = 1, on the
    issue's training schedule. Bounds against the float64 levels, with 1e-6 for float32
    rounding. Uniformity by Kolmogorov-Smirnov on (gamma - lower) / (upper - lower) against
    U(0, 1): for a uniform draw sqrt(n) D exceeds 1.949 with probability 0.001."""
    betas = np.linspace(1e-4, 2e-2, 2000)
    s = schedules.from_betas(betas)
    levels = np.append(1.0, sqrt_alpha_bar(betas))  # levels[t] = sqrt(abar_t), t = 0..T
    n = 20_000
    for i, index in enumerate([0, 1, 999, 1999]):
        t = jnp.full((n,), index, jnp.int32)
        gamma = np.asarray(diffusion.sample_noise_level(s, t, jax.random.key(i)), np.float64)
        lower, upper = levels[index + 1], levels[index]
        # float32 tables and arithmetic: about 1e-7 of rounding at the ends.
        assert gamma.min() >= lower - 1e-6 and gamma.max() <= upper + 1e-6, index
        u = (gamma - lower) / (upper - lower)
        stat = scipy.stats.kstest(u, "uniform").statistic
        assert np.sqrt(n) * stat < 1.949, (index, stat)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_noises_x0_at_the_level_the_network_is_told(parameterization):
    """A denoiser that reads gamma from its time input and inverts x_t = gamma x_0 +
    sqrt(1 - gamma^2) eps exactly has zero loss only if x_t was made with that same gamma; with
    x_t at sqrt(abar_t) instead the loss would be ~1e-4 here (levels of adjacent steps differ by
    ~1e-3 to 1e-2). t >= 1 keeps sqrt(1 - gamma^2) >= 0.04, so float32 rounding stays < 1e-10."""
    s = schedules.make_schedule("linear", 50)
    key_x, key_t, key_loss = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.uniform(key_x, (64, 4, 4, 1), minval=-1.0, maxval=1.0)
    t = jax.random.randint(key_t, (64,), 1, 50)
    seen = []

    def exact(x_t, time):
        seen.append(np.asarray(time))
        gamma = (time / diffusion.NOISE_LEVEL_SCALE)[:, None, None, None]
        sigma = jnp.sqrt(1 - gamma**2)
        eps = (x_t - gamma * x0) / sigma
        return eps if parameterization == "eps" else gamma * eps - sigma * x0

    terms = diffusion.training_losses(
        s, exact, x0, t, key_loss, parameterization=parameterization, noise_conditioning=SQRT
    )
    assert float(jnp.max(terms["mse"])) < 1e-8
    levels = np.append(1.0, sqrt_alpha_bar(s.betas))
    gamma = seen[0] / diffusion.NOISE_LEVEL_SCALE
    t = np.asarray(t)
    assert np.all(gamma >= levels[t + 1] - 1e-6) and np.all(gamma <= levels[t] + 1e-6)
    assert len(np.unique(gamma)) == 64  # drawn per example, not the table's levels


def chain_moments(betas, sampler: str) -> tuple[float, float]:
    """Mean and std of the samples of a chain on `betas` started from N(0, 1), for the exact
    eps of N(MU, SD^2) data, in float64. Every step is linear in x_t plus Gaussian noise:
    x_{t-1} = A x_t + B + sigma z, so the moments propagate exactly. DDPM (Ho et al. eqs. 7,
    11) with sigma_t^2 = beta_t; DDIM eta = 0 (Song et al. eq. 12)."""
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    prev = np.append(1.0, alpha_bar[:-1])
    mean, var = 0.0, 1.0
    for t in range(len(betas) - 1, -1, -1):
        a, g = alpha_bar[t], np.sqrt(alpha_bar[t])
        k = np.sqrt(1 - a) / (a * SD**2 + 1 - a)  # eps = k (x - g MU)
        p, q = (1 - np.sqrt(1 - a) * k) / g, np.sqrt(1 - a) * k * MU  # x0_pred = p x + q
        if sampler == "ddpm":
            c1 = betas[t] * np.sqrt(prev[t]) / (1 - a)
            c2 = (1 - prev[t]) * np.sqrt(1 - betas[t]) / (1 - a)
            A, B, noise_var = c1 * p + c2, c1 * q, betas[t] if t > 0 else 0.0
        else:
            d = np.sqrt(1 - prev[t])
            A, B = np.sqrt(prev[t]) * p + d * k, np.sqrt(prev[t]) * q - d * k * g * MU
            noise_var = 0.0
        mean, var = A * mean + B, A * A * var + noise_var
    return mean, np.sqrt(var)


SAMPLE_SHAPE = (4096, 4, 4, 1)  # 65,536 independent scalars


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_continuous_optimal_denoiser_sampled_on_another_schedule_reproduces_the_data(
    sampler,
):
    """Trained on T = 2000 (the issue's), sampled on its 100-step linspace(1e-4, 0.1) schedule.
    Monte-Carlo: 65,536 scalars give a standard error of 0.4% of s on the mean and 0.28% on the
    std; the samples must match the exact moments of this 100-step chain within 4 standard
    errors, and N(MU, SD^2) itself within 5% (the 100 coarse steps' own bias is -2% of the std
    for DDIM, +1.2% for DDPM with sigma^2 = beta, and -2.2% of s on DDIM's mean from starting at
    N(0, I) instead of q(x_T) with sqrt(abar_T) = 0.075). Told integer steps instead of levels,
    the same denoiser misses by far more (checked), so the test sees which levels the chain
    passes."""
    config = tiny_config(SR3)
    s = schedules.sampling_schedule(config, training.make_schedule(config))
    assert s.num_timesteps == 100
    eps_fn = optimal_eps_of_level_fn(MU, SD)
    run = dict(
        ddpm=lambda k, nc: samplers.ddpm_sample(
            eps_fn, s, SAMPLE_SHAPE, k, clip_denoised=False, noise_conditioning=nc
        ),
        ddim=lambda k, nc: samplers.ddim_sample(
            eps_fn, s, SAMPLE_SHAPE, k, num_steps=100, clip_denoised=False, noise_conditioning=nc
        ),
    )[sampler]
    x = np.asarray(jax.jit(lambda k: run(k, SQRT))(jax.random.key(0)), np.float64)
    mean, std = chain_moments(np.asarray(s.betas, np.float64), sampler)
    n = x.size
    assert abs(x.mean() - mean) < 4 * std / np.sqrt(n), (x.mean(), mean)
    assert abs(x.std() / std - 1) < 4 / np.sqrt(2 * n), (x.std(), std)
    assert abs(x.mean() - MU) < 0.05 * SD and abs(x.std() / SD - 1) < 0.05, (x.mean(), x.std())

    wrong = np.asarray(jax.jit(lambda k: run(k, "timestep"))(jax.random.key(0)))
    assert abs(wrong.mean() - MU) > 0.2 * SD or abs(wrong.std() / SD - 1) > 0.2


def test_every_entry_point_tells_the_network_the_level_of_its_schedule():
    """calc_bpd, run_chain (via make_sampler, on config.sampling.schedule) and ddim_invert pass
    NOISE_LEVEL_SCALE * sqrt(abar_t) of the schedule they run on; with 'timestep' the integer
    steps, as before."""
    s = schedules.make_schedule("linear", 10, beta_start=1e-3, beta_end=0.2)
    levels = diffusion.NOISE_LEVEL_SCALE * sqrt_alpha_bar(s.betas)
    seen = []

    def record(x_t, time):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), time)
        return jnp.zeros_like(x_t)

    def times():
        out = np.unique(np.concatenate(seen))
        seen.clear()
        return out

    x0 = jnp.zeros((2, 2, 2, 1))
    diffusion.calc_bpd(s, record, x0, jax.random.key(0), noise_conditioning=SQRT)
    np.testing.assert_allclose(times(), np.sort(levels), rtol=1e-6)
    diffusion.calc_bpd(s, record, x0, jax.random.key(0))
    np.testing.assert_array_equal(times(), np.arange(10))
    samplers.ddim_invert(record, s, x0, num_steps=10, noise_conditioning=SQRT)
    np.testing.assert_allclose(times(), np.sort(levels), rtol=1e-6)

    config = tiny_config(SR3)
    sample_levels = diffusion.NOISE_LEVEL_SCALE * sqrt_alpha_bar(np.linspace(1e-4, 0.1, 100))

    class Model:  # a stand-in for the Flax model: apply() records the time inputs
        def apply(self, variables, x_t, time, train):
            return record(x_t, time)

    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
    sample = generate.make_sampler(Model(), training.make_schedule(config), config, mesh)
    sample({}, jax.random.key(0), 2, sampler="ddpm")
    np.testing.assert_allclose(times(), np.sort(sample_levels), rtol=1e-6)


@pytest.mark.slow
def test_train_steps_of_a_tiny_unet_with_continuous_levels():
    """The tiny UNet trains with sqrt_alpha_bar conditioning: finite losses, and then its output
    depends on the level. Two steps: the UNet starts with conv_out and every residual block's
    last convolution at zero, so the first step's gradient reaches only conv_out and the output
    after it does not yet depend on the time embedding; the second moves the residual
    convolutions through which the embedding acts. Plain Flax kernels ('xla'): they compile
    faster than the CPU kernels; compiling the step is still most of this test's 20-60 s on the
    shared cores."""
    config = tiny_config({"diffusion.noise_conditioning": SQRT, "model.kernels": "xla"})
    validate_config(config)
    model = models.create_model(training.model_config(config))
    optimizer, lr = training.make_optimizer(config)
    schedule = training.make_schedule(config)
    step = jax.jit(training.make_train_step(model, schedule, config, optimizer, lr))
    state = training.init_state(model, optimizer, config, jax.random.key(0))
    images = jax.random.randint(jax.random.key(1), (8, 8, 8, 1), 0, 256).astype(jnp.uint8)
    for _ in range(2):
        state, metrics = step(state, images, jax.random.key(2))
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert int(state.nonfinite_steps) == 0

    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))

    def out(gamma):
        time = diffusion.scaled_level(jnp.full((2,), gamma))
        return np.asarray(model.apply({"params": state.params}, x, time, train=False))

    a, b = out(0.3), out(0.31)
    assert np.abs(a).max() > 0
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max(), np.abs(a - b).max()


def _refused(overrides: dict, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        validate_config(tiny_config(overrides))


def test_the_issues_example_validates_and_a_timestep_model_refuses_another_schedule():
    validate_config(tiny_config(SR3))
    _refused(
        {**SR3, "diffusion.noise_conditioning": "timestep"},
        r"sampling\.schedule\.name='linear' is invalid: expected '' with "
        r"diffusion\.noise_conditioning='timestep'",
    )


def test_a_sampling_schedule_below_the_trained_levels_is_refused():
    """The default training schedule (linear, T = 1000) reaches sqrt(abar_T) = 0.0064; the
    issue's 100-step schedule stops at 0.075 (inside), 400 steps to beta 0.1 reach 3.2e-5
    (outside by more than the 1e-3 slack)."""
    base = {k: v for k, v in SR3.items() if not k.startswith("diffusion.")}
    base["diffusion.noise_conditioning"] = SQRT
    validate_config(tiny_config({**base, "diffusion.num_timesteps": 1000}))
    _refused(
        {**base, "diffusion.num_timesteps": 1000, "sampling.schedule.num_timesteps": 400},
        r"sampling\.schedule=.* smallest sqrt\(alpha_bar\) is 3\.16e-05, below the training "
        r"schedule's smallest 0\.00635 \(slack 0\.001\)",
    )


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"diffusion.loss_type": "kl"}, r"noise_conditioning: .*loss_type 'kl', 'hybrid'"),
        (
            {"diffusion.loss_type": "hybrid", "diffusion.var_type": "learned_range"},
            r"noise_conditioning: .*learned_range",
        ),
        ({"diffusion.noise_conditioning": "log_snr"}, r"noise_conditioning='log_snr' is invalid"),
        ({"sampling.steps": 101}, r"sampling\.steps=101 .* sampling\.schedule\.num_timesteps=100"),
        ({"sampling.schedule.name": "cosin"}, r"sampling\.schedule\.name='cosin' is invalid"),
        ({"sampling.schedule.num_timesteps": 0}, r"sampling\.schedule\.num_timesteps=0"),
        ({"sampling.schedule.beta_end": 1.5}, r"sampling\.schedule\.beta_end=1\.5 is invalid"),
        ({"diffusion.beta_start": 0.0}, r"diffusion\.beta_start=0\.0 is invalid"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_bad_noise_conditioning_settings_are_refused(overrides, pattern):
    _refused({**SR3, **overrides}, pattern)


def test_a_config_without_the_new_fields_validates_as_timestep_on_the_training_schedule():
    """A workdir's config.json written before these fields existed still loads."""
    config = tiny_config()
    for section, field in [
        ("diffusion", "noise_conditioning"),
        ("diffusion", "beta_start"),
        ("diffusion", "beta_end"),
        ("sampling", "schedule"),
    ]:
        del config[section][field]
    validate_config(config)
    s = schedules.sampling_schedule(config)
    np.testing.assert_array_equal(s.betas, schedules.make_schedule("linear", 40).betas)


def test_the_train_cli_refuses_a_sampling_schedule_for_a_timestep_model(tmp_path):
    result = run_cli(
        tmp_path / "run",
        {"sampling.schedule.name": "linear", "sampling.schedule.num_timesteps": 10},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "noise_conditioning='timestep'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_sample_cli_bounds_steps_by_the_sampling_schedule():
    from diffusion_jax import cli, sample

    config = tiny_config(SR3)
    assert sample.sampler_options(config, steps=100)["steps"] == 100
    with pytest.raises(cli.UserError, match=r"--steps=101: expected 1 to 100 .*sampling\.schedule"):
        sample.sampler_options(config, steps=101)
