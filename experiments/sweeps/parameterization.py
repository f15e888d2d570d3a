"""What the network predicts (study 1): eps vs x0 vs v on the embedded digits, one seed each,
scored by FD and class IS of 1,000 DDIM-50 samples against the digits and by test bits/dim."""

from diffusion_jax.sweep import product

CONFIG = "configs/ddpm_digits.py"

EVALUATE = [
    {"metric": "fid", "num_samples": 1000},
    {"metric": "is", "num_samples": 1000},
    {"metric": "nll", "num_samples": 360},
]

QUICK = {
    "config": {"training.num_train_steps": 20, "training.sample_every": 0},
    "evaluate": {"num_samples": 100},
}


def get_points():
    return product({"diffusion.parameterization": ["eps", "x0", "v"]})
