"""Schedules: named values, monotonicity, end values, respacing, bad input."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_every_schedule_builds_a_consistent_table(name):
    s = schedules.make_schedule(name, 1000)
    betas = np.asarray(s.betas, np.float64)
    assert s.num_timesteps == 1000
    assert np.all(betas > 0) and np.all(betas <= 1)
    assert np.all(np.diff(betas) >= -1e-12), "betas must not decrease"
    abar = np.asarray(s.alphas_cumprod, np.float64)
    assert np.all(np.diff(abar) < 0)
    assert abar[-1] < 1e-3, "x_T must be close to pure noise"
    # atol: near beta = 0.999 (cosine's cap) float32 rounding of beta is amplified in 1 - beta.
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6)
    assert float(s.alphas_cumprod_prev[0]) == 1.0


def test_linear_has_the_ddpm_paper_values():
    s = schedules.make_schedule("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4, rel=1e-6)
    assert float(s.betas[-1]) == pytest.approx(0.02, rel=1e-6)
    # linspace: constant increments.
    np.testing.assert_allclose(
        np.diff(np.asarray(s.betas, np.float64)), (0.02 - 1e-4) / 999, rtol=1e-3
    )


def test_linear_scales_with_T_like_improved_ddpm():
    s = schedules.make_schedule("linear", 250)
    assert float(s.betas[0]) == pytest.approx(4e-4, rel=1e-6)
    assert float(s.betas[-1]) == pytest.approx(0.08, rel=1e-6)


def test_cosine_matches_its_alpha_bar_formula():
    T, offset = 1000, 0.008

    def f(t):
        return math.cos((t / T + offset) / (1 + offset) * math.pi / 2) ** 2

    s = schedules.make_schedule("cosine", T)
    # Away from the end where betas are capped at 0.999, alpha_bar_t = f(t) / f(0).
    for t in [0, 10, 500, 900]:
        assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert float(np.max(s.betas)) <= 0.999 + 1e-7


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Each beta schedule written from its source, one beta at a time (index i = paper's t - 1):
# quad, const, jsd, warmupN from the DDPM code (diffusion_utils_2.get_beta_schedule), sigmoid
# from the DDIM code, cosine from improved DDPM (eq. 17 and betas_for_alpha_bar).
def _beta_formula(name, i, T, start, end):
    if name == "linear":
        return start + (end - start) * i / (T - 1)
    if name == "quadratic":
        return (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (T - 1)) ** 2
    if name == "sigmoid":
        return _sigmoid(-6.0 + 12.0 * i / (T - 1)) * (end - start) + start
    if name == "const":
        return end
    if name == "jsd":
        return 1.0 / (T - i)
    if name in ("warmup10", "warmup50"):
        warmup = int(T * int(name[len("warmup") :]) / 100)
        return start + (end - start) * i / (warmup - 1) if i < warmup else end
    assert name == "cosine"

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 200])
def test_every_beta_schedule_matches_its_formula(name, T):
    # DDPM's 1e-4 and 0.02, scaled by 1000 / T (improved DDPM's rule).
    start, end = 1e-4 * 1000 / T, 0.02 * 1000 / T
    want = np.array([_beta_formula(name, i, T, start, end) for i in range(T)])
    betas = schedules.get_beta_schedule(name, T)
    # float64 on both sides, the formulas evaluated in different orders: ~1e-15 relative.
    np.testing.assert_allclose(betas, want, rtol=1e-12)
    np.testing.assert_allclose(schedules.make_schedule(name, T).betas, want, rtol=1e-6)


def test_posterior_tables_match_their_definitions():
    s = schedules.make_schedule("quadratic", 100)
    b = np.asarray(s.betas, np.float64)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    var = b * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(var[1:]), rtol=1e-5)
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(var[1]), rel=1e-5)
    np.testing.assert_allclose(
        s.posterior_mean_coef1, b * np.sqrt(abar_prev) / (1 - abar), rtol=1e-5
    )
    np.testing.assert_allclose(
        s.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar), rtol=1e-5
    )
    assert s.betas.dtype == np.float32 and s.timesteps.dtype == np.int32


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    s = schedules.make_schedule("linear", 1000)
    kept = schedules.space_timesteps(1000, 50)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 50
    r = schedules.respace(s, kept)
    assert r.num_timesteps == 50
    np.testing.assert_allclose(r.alphas_cumprod, np.asarray(s.alphas_cumprod)[kept], rtol=1e-6)
    np.testing.assert_array_equal(r.timesteps, kept)
    # Respacing a respaced schedule composes: its timesteps map to the original steps.
    rr = schedules.respace(r, np.array([0, 10, 49]))
    np.testing.assert_array_equal(rr.timesteps, kept[[0, 10, 49]])
    np.testing.assert_allclose(
        rr.alphas_cumprod, np.asarray(s.alphas_cumprod)[kept[[0, 10, 49]]], rtol=1e-6
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedules.make_schedule("lin", 10), "unknown schedule 'lin'"),
        (lambda: schedules.make_schedule("linear", 0), "num_timesteps must be >= 1"),
        (lambda: schedules.make_schedule("linear", 2.5), "num_timesteps must be an int"),
        (lambda: schedules.make_schedule("linear", 10), "outside \\(0, 1\\)"),
        (lambda: schedules.make_schedule("linear", 20), "use more timesteps"),
        (lambda: schedules.space_timesteps(100, 101), "num_steps must be in \\[1, T=100\\]"),
        (lambda: schedules.respace(schedules.make_schedule("linear", 100), [5, 3]), "increasing"),
        (
            lambda: schedules.respace(schedules.make_schedule("linear", 100), [0, 100]),
            "\\[0, 100\\)",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
