"""Noise schedules at equal training budget (study 6): linear, cosine and quadratic on the
embedded digits, and a linear schedule ending at beta_T = 0.005, whose alpha_bar_T = 0.08 is far
from 0 (the notes: the forward process must end close to N(0, I), since sampling starts there)."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

from diffusion_jax.sweep import zipped

CONFIG = "configs/ddpm_digits.py:short"


def get_points():
    return [
        *zipped({"diffusion.schedule": ["linear", "cosine", "quadratic"]}),
        {"diffusion.schedule": "linear", "diffusion.beta_end": 0.005},
    ]
