"""Which loss (study 2, the DDPM paper's Table 2 trade-off): L_simple, the true variational
bound L_vlb ("kl", fixed variance beta_t) and improved DDPM's hybrid L_simple + 0.001 L_vlb with
a learned variance, on the embedded digits: sample quality against test bits/dim."""

from _digits import EVALUATE, QUICK  # noqa: F401  (the sweep CLI reads them)

from diffusion_jax.sweep import zipped

CONFIG = "configs/ddpm_digits.py:short"


def get_points():
    return zipped(
        {
            "diffusion.loss_type": ["simple", "kl", "hybrid"],
            "diffusion.var_type": ["fixed_large", "fixed_large", "learned_range"],
        }
    )
