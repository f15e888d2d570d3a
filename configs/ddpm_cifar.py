"""DDPM on CIFAR-10 (Ho et al. 2020, Sec. 4 and App. B): the paper's settings."""

from ml_collections import config_dict


def get_config():
    config = config_dict.ConfigDict()
    config.seed = 0

    config.data = dict(
        dataset="cifar10",  # tfds; once: python -m diffusion_jax.data.prepare --dataset=cifar10
        image_size=32,
        num_channels=3,
        random_flip=True,
        data_dir="",  # "" = tfds' default
        eval_split="test",
        cache_in_memory=True,  # decode the 50,000 PNGs once (146 MiB), not at every step
    )
    config.model = dict(
        name="unet",
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_heads=1,
        num_groups=32,
        resamp_with_conv=True,
        num_classes=0,
        dtype="float32",
    )
    config.diffusion = dict(
        schedule="linear",  # beta_1 = 1e-4 ... beta_T = 0.02
        num_timesteps=1000,
        parameterization="eps",
        var_type="fixed_large",  # sigma_t^2 = beta_t for sampling (Sec. 3.2)
        loss_type="simple",  # L_simple (eq. 14)
        hybrid_lambda=0.001,
    )
    config.optim = dict(
        optimizer="adam",
        lr=2e-4,
        warmup_steps=5000,
        lr_schedule="constant",
        grad_clip=1.0,
        ema_decay=0.9999,
        ema_warmup=False,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    config.training = dict(
        batch_size=128,
        num_train_steps=800_000,
        log_every=100,
        checkpoint_every=10_000,
        sample_every=50_000,
        keep_checkpoints=2,
        num_preview_samples=64,
        nan_policy="stop",  # or "skip": drop the update and count it
        mixed_precision=False,
    )
    config.sampling = dict(sampler="ddpm", steps=1000, eta=0.0, clip_denoised=True, batch_size=256)
    config.distributed = dict(
        coordinator_address="",  # "host:port" of process 0, or "auto" (TPU pods, SLURM)
        num_processes=1,
        process_id=0,
        initialization_timeout=300,  # seconds to wait for every process to join
        heartbeat_timeout=100,  # seconds of silence after which a process is declared dead
    )
    return config
