"""Class-conditional DDPM on the embedded 8x8 digits with classifier-free guidance.

configs/ddpm_digits.py:short's model and training (the 2,000-step recipe) with class labels
(num_classes=10, label 10 the null label), 10% of the labels dropped onto the null label in
training (Ho & Salimans 2022 use 0.1-0.2), and guidance weight w = 1 at sampling:
eps = 2 eps(x, y) - eps(x, null), where
nearly every sample is recognised as its class at a modest cost in FD; larger w trades FD
for class fidelity. `--guidance=W` of the sample CLI overrides it. Variants as in ddpm_digits.py.
"""

import runpy
from pathlib import Path

from diffusion_jax.config import load_config, override

DIGITS = str(Path(__file__).with_name("ddpm_digits.py"))
VARIANTS = runpy.run_path(DIGITS)["VARIANTS"]


def get_config(arg=None):
    config = load_config(f"{DIGITS}:short" + (f",{arg}" if arg else ""))  # and the variants
    override(
        config,
        {
            "model.num_classes": 10,
            "conditioning.p_uncond": 0.1,
            "sampling.guidance": 1.0,
        },
    )
    return config
