"""The embedded default: DDPM on scikit-learn's 8x8 handwritten digits, trained on a laptop CPU.

A small UNet, a cosine learning-rate decay and DDIM sampling keep training under 10 minutes and
sampling 1,000 digits under 2 minutes on 2 CPU cores (README). Variants:
`--config=configs/ddpm_digits.py:v` (or `:x0`, `:cosine`, `:learned`, `:v,cosine`, ...).
"""

from diffusion_jax.config import base_config, override, with_variants

VARIANTS = {
    "x0": {"diffusion.parameterization": "x0"},
    "v": {"diffusion.parameterization": "v"},
    "cosine": {"diffusion.schedule": "cosine"},
    # improved DDPM: a learned variance trained by the hybrid loss
    "learned": {"diffusion.var_type": "learned_range", "diffusion.loss_type": "hybrid"},
    "ddpm_sampler": {"sampling.sampler": "ddpm", "sampling.steps": 1000},
}


def get_config(arg=None):
    config = base_config()
    override(
        config,
        {
            "data.dataset": "digits",
            "data.image_size": 8,
            "data.num_channels": 1,
            "data.random_flip": False,  # digits are not mirror-symmetric
            "model.ch": 32,
            "model.ch_mult": (1, 2),
            "model.num_res_blocks": 1,
            "model.attn_resolutions": (4,),
            "model.dropout": 0.0,
            "optim.lr": 2e-3,
            "optim.warmup_steps": 100,
            "optim.lr_schedule": "cosine",
            "optim.ema_decay": 0.999,
            "optim.ema_warmup": True,
            "training.batch_size": 64,
            "training.num_train_steps": 2000,
            "training.checkpoint_every": 500,
            "training.sample_every": 1000,
            "training.num_preview_samples": 100,
            "sampling.sampler": "ddim",
            "sampling.steps": 50,
            "sampling.batch_size": 1000,
        },
    )
    return with_variants(config, arg, VARIANTS)
