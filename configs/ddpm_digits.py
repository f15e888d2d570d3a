"""The embedded default: DDPM on scikit-learn's 8x8 handwritten digits, trained on a laptop CPU.

A small UNet, a shorter linear schedule and DDIM sampling keep training under 10 minutes and
sampling 1,000 digits under 2 minutes on 2 CPU cores (see README for the measured run).
"""

from ml_collections import config_dict


def get_config():
    config = config_dict.ConfigDict()
    config.seed = 0

    config.data = dict(
        dataset="digits",
        image_size=8,
        num_channels=1,
        random_flip=False,  # digits are not mirror-symmetric
        data_dir="",
        eval_split="test",
    )
    config.model = dict(
        name="unet",
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        num_heads=1,
        num_groups=32,
        resamp_with_conv=True,
        num_classes=0,
        dtype="float32",
    )
    config.diffusion = dict(
        schedule="linear",
        num_timesteps=1000,
        parameterization="eps",
        var_type="fixed_large",
        loss_type="simple",
        hybrid_lambda=0.001,
    )
    config.optim = dict(
        optimizer="adam",
        lr=2e-3,
        warmup_steps=100,
        lr_schedule="cosine",
        grad_clip=1.0,
        ema_decay=0.999,
        ema_warmup=True,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    config.training = dict(
        batch_size=64,
        num_train_steps=2000,
        log_every=100,
        checkpoint_every=500,
        sample_every=1000,
        keep_checkpoints=2,
        num_preview_samples=100,
        nan_policy="stop",
        mixed_precision=False,
    )
    config.sampling = dict(sampler="ddim", steps=50, eta=0.0, clip_denoised=True, batch_size=1000)
    config.distributed = dict(
        coordinator_address="",  # "host:port" of process 0, or "auto" (TPU pods, SLURM)
        num_processes=1,
        process_id=0,
        initialization_timeout=300,  # seconds to wait for every process to join
        heartbeat_timeout=100,  # seconds of silence after which a process is declared dead
    )
    return config
