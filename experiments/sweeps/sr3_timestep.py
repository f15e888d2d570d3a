"""configs/sr3_photos.py:short,timestep: the same SR3 model and training, conditioned on the integer
timestep instead of the noise level (experiments/sr3_schedule.py's baseline)."""

from _photos import QUICK  # noqa: F401  (the sweep CLI reads it)

CONFIG = "configs/sr3_photos.py:short,timestep"


def get_points():
    return [{}]
