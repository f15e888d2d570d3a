"""configs/deblur_photos.py as docs/results.md trains it: predict-and-refine deblurring, for
the perception-distortion study (experiments/perception_distortion.py, which samples and
scores it)."""

from _photos import QUICK as PHOTOS_QUICK

# --quick: the photo sweeps' smoke settings, and a one-level predictor as well
QUICK = {"config": {**PHOTOS_QUICK["config"], "model.predictor_ch_mult": (1,)}}

CONFIG = "configs/deblur_photos.py"


def get_points():
    return [{}]
