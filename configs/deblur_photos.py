"""Deblurring by predict-and-refine (Whang et al. 2022) on the embedded photo patches.

The condition y is the 32x32 patch blurred by a Gaussian of standard deviation
conditioning.blur_sigma = 1.5 pixels (scipy's gaussian_filter: reflect, truncated at 4 sigma)
and rounded to uint8 levels. A Refiner holds a small predictor UNet g, trained by L2 to map y to
the sharp image, and a denoiser UNet of the residual x - g(y) conditioned on y and g(y);
both are trained jointly in one run, the predictor by its L2 loss alone and the denoiser by the
diffusion loss alone (g(y) under stop_gradient: training.make_loss_fn). A sample is g(y) plus a
sampled residual (`sample --condition=BLURRED.npz`); the mean of several samples of one input
moves from the sharp, perceptual end of the perception-distortion curve towards g(y), the
regression end. Variants: `:noisy` adds observation noise of 2 grey levels.
"""

from diffusion_jax.config import base_config, override, with_variants

VARIANTS = {"noisy": {"conditioning.noise_std": 4 / 255}}


def get_config(arg=None):
    config = base_config()
    config.model.update(predictor_ch=32, predictor_ch_mult=(1, 2, 2), predictor_num_res_blocks=1)
    override(
        config,
        {
            "data.dataset": "photos",
            "data.image_size": 32,
            "data.num_channels": 3,
            "data.random_flip": True,
            "model.name": "refiner",
            "model.ch": 32,
            "model.ch_mult": (1, 2, 2),
            "model.num_res_blocks": 1,
            "model.attn_resolutions": (8,),
            "model.dropout": 0.0,
            "diffusion.parameterization": "v",  # as in sr3_photos.py
            "conditioning.degradation": "blur",
            "conditioning.blur_sigma": 1.5,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 200,
            "optim.lr_schedule": "cosine",
            "optim.ema_decay": 0.999,
            "optim.ema_warmup": True,
            "training.batch_size": 32,
            "training.num_train_steps": 1000,
            "training.log_every": 100,
            "training.checkpoint_every": 500,
            "training.sample_every": 0,
            "sampling.sampler": "ddpm",
            "sampling.steps": 100,
            "sampling.batch_size": 288,
        },
    )
    return with_variants(config, arg, VARIANTS)
