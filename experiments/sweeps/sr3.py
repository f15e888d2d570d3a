"""configs/sr3_photos.py as docs/results.md trains it: SR3 conditioned on the continuous noise
level, for the schedule study (experiments/sr3_schedule.py, which samples and scores it)."""

from _photos import QUICK  # noqa: F401  (the sweep CLI reads it)

CONFIG = "configs/sr3_photos.py"


def get_points():
    return [{}]
