"""configs/sr3_photos.py:short (1,000 training steps, not docs/results.md's 1,500, so that all
studies fit in 3 hours): SR3 conditioned on the continuous noise level, for the schedule study
(experiments/sr3_schedule.py, which samples and scores it)."""

from _photos import QUICK  # noqa: F401  (the sweep CLI reads it)

CONFIG = "configs/sr3_photos.py:short"


def get_points():
    return [{}]
