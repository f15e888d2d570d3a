"""DDPM on CIFAR-10 (Ho et al. 2020, Sec. 4 and App. B): the paper's settings, which are the
library's defaults. Prepare the data once: `python -m diffusion_jax.data.prepare --dataset=cifar10`.
Variants: `--config=configs/ddpm_cifar.py:cosine` (or `:learned`, `:v`, `:ddim`)."""

from diffusion_jax.config import base_config, override, with_variants

VARIANTS = {
    "cosine": {"diffusion.schedule": "cosine"},
    "learned": {"diffusion.var_type": "learned_range", "diffusion.loss_type": "hybrid"},
    "v": {"diffusion.parameterization": "v"},
    "ddim": {"sampling.sampler": "ddim", "sampling.steps": 100},
}


def get_config(arg=None):
    config = base_config()
    override(
        config,
        {
            "data.dataset": "cifar10",
            "data.cache_in_memory": True,  # decode the 50,000 PNGs once (146 MiB), not every step
        },
    )
    return with_variants(config, arg, VARIANTS)
