"""The embedded default: DDPM on scikit-learn's 8x8 handwritten digits, trained on a laptop CPU.

A small UNet (no attention, dropout 0.1), the cosine schedule, 5,500 steps with a cosine
learning-rate decay and EMA 0.9995, and DDPM ancestral sampling respaced to 50 steps: training
stays under 10 minutes and sampling 1,000 digits under a minute on 2 CPU cores, and the samples
score like real digits against the data (README; the levers measured are in docs/results.md).
`:short` is the earlier 2,000-step recipe (linear schedule, attention at 4x4, DDIM 50 steps,
2-4 minutes) on which the studies in experiments/ compare their settings. Variants:
`--config=configs/ddpm_digits.py:v` (or `:x0`, `:learned`, `:short,v`, `:short,cosine`, ...).
"""

from diffusion_jax.config import base_config, override, with_variants

VARIANTS = {
    "x0": {"diffusion.parameterization": "x0"},
    "v": {"diffusion.parameterization": "v"},
    "cosine": {"diffusion.schedule": "cosine"},
    # improved DDPM: a learned variance trained by the hybrid loss
    "learned": {"diffusion.var_type": "learned_range", "diffusion.loss_type": "hybrid"},
    "ddpm_sampler": {"sampling.sampler": "ddpm", "sampling.steps": 1000},
    "short": {
        "diffusion.schedule": "linear",
        "model.attn_resolutions": (4,),
        "model.dropout": 0.0,
        "optim.ema_decay": 0.999,
        "training.num_train_steps": 2000,
        "sampling.sampler": "ddim",
        "sampling.steps": 50,
    },
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
            "diffusion.schedule": "cosine",
            "model.ch": 32,
            "model.ch_mult": (1, 2),
            "model.num_res_blocks": 1,
            "model.attn_resolutions": (),
            "model.dropout": 0.1,
            "optim.lr": 2e-3,
            "optim.warmup_steps": 100,
            "optim.lr_schedule": "cosine",
            "optim.ema_decay": 0.9995,
            "optim.ema_warmup": True,
            "training.batch_size": 64,
            "training.num_train_steps": 5500,
            "training.checkpoint_every": 500,
            "training.sample_every": 1000,
            "training.num_preview_samples": 100,
            "sampling.sampler": "ddpm",
            "sampling.steps": 50,
            "sampling.batch_size": 1000,
        },
    )
    return with_variants(config, arg, VARIANTS)
