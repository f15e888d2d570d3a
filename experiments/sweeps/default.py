"""configs/ddpm_digits.py exactly as the README trains it: the checkpoint of the README's digits
table (experiments/digits_table.py)."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

CONFIG = "configs/ddpm_digits.py"


def get_points():
    return [{}]
