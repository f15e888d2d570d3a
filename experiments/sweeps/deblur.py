"""configs/deblur_photos.py as docs/results.md trains it: predict-and-refine deblurring, for
the perception-distortion study (experiments/perception_distortion.py, which samples and
scores it)."""

from _photos import QUICK  # noqa: F401  (the sweep CLI reads it)

CONFIG = "configs/deblur_photos.py"


def get_points():
    return [{}]
