"""configs/classifier_digits.py as docs/results.md trains it, for the guidance study
(experiments/guidance.py, which samples and scores it itself)."""

from _digits import QUICK  # noqa: F401  (the sweep CLI reads it)

CONFIG = "configs/classifier_digits.py"


def get_points():
    return [{}]
