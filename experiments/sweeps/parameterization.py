"""What the network predicts (study 1): eps vs x0 vs v vs the posterior mean mu on the embedded
digits, one seed each, and mu trained on the true bound (loss kl, the DDPM paper's way of
training it), scored by FD and class IS of 1,000 DDIM-50 samples against the digits and by test
bits/dim."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

from diffusion_jax.sweep import product

CONFIG = "configs/ddpm_digits.py:short"


def get_points():
    mu_on_the_bound = {"diffusion.parameterization": "mu", "diffusion.loss_type": "kl"}
    return product({"diffusion.parameterization": ["eps", "x0", "v", "mu"]}) + [mu_on_the_bound]
