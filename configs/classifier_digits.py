"""A noisy classifier p(y | x_t, t) of the digits, for classifier guidance (Dhariwal & Nichol
2021): the encoder half of configs/ddpm_digits.py's UNet with an attention-pooled head, trained
by cross-entropy on x_t at uniform t of the same schedule (T = 1000, linear), so that its
gradient can guide the digits diffusion model. Variants: `:mean` (mean-pooled head),
`:cutoff` (t only below 500, as a classifier used for the less noisy half of the chain).
"""

from diffusion_jax.config import base_config, override, with_variants

VARIANTS = {
    "mean": {"model.pool": "mean"},
    "cutoff": {"training.t_cutoff": 500},
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
            "optim.lr": 1e-3,
            "optim.warmup_steps": 100,
            "optim.lr_schedule": "cosine",
            "optim.ema_decay": 0.999,
            "optim.ema_warmup": True,
            "training.objective": "classifier",
            "training.batch_size": 64,
            "training.num_train_steps": 2000,
            "training.checkpoint_every": 500,
            "training.sample_every": 0,  # a classifier draws no samples
        },
    )
    config.training.t_cutoff = 0  # t uniform over {0, ..., t_cutoff - 1}; 0 = every t
    # The classifier's own fields (models.Classifier) replace the UNet's.
    config.model = dict(
        name="classifier",
        image_size=config.data.get_ref("image_size"),
        in_channels=config.data.get_ref("num_channels"),
        num_classes=10,
        pool="attention",
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        num_heads=1,
        num_groups=32,
        resamp_with_conv=True,
        dtype="float32",
        kernels="auto",
    )
    return with_variants(config, arg, VARIANTS)
