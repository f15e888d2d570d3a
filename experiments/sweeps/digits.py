"""configs/ddpm_digits.py:short, the 2,000-step recipe: the one checkpoint that the studies of
sampling (reverse variance, one-step predictions, DDIM steps, guidance) evaluate."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

CONFIG = "configs/ddpm_digits.py:short"


def get_points():
    return [{}]
