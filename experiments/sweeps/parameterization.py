"""What the network predicts (study 1): eps vs x0 vs v on the embedded digits, one seed each,
scored by FD and class IS of 1,000 DDIM-50 samples against the digits and by test bits/dim."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

from diffusion_jax.sweep import product

CONFIG = "configs/ddpm_digits.py:short"


def get_points():
    return product({"diffusion.parameterization": ["eps", "x0", "v"]})
