"""configs/ddpm_digits.py as the README trains it: the one checkpoint that the studies of
sampling (reverse variance, one-step predictions, DDIM steps) evaluate."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

CONFIG = "configs/ddpm_digits.py"


def get_points():
    return [{}]
