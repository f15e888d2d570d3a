"""The defaults every experiment config starts from, and named variants of a config.

An experiment config file (configs/*.py) is `get_config(arg=None)`: `base_config()` with the
dataset's settings on top, then the variants named in `arg` (`--config=configs/X.py:v,cosine`)
from the file's own table, applied by `with_variants`. Values that two sections share are one
value: `model.image_size` and `model.in_channels` are references to `data.image_size` and
`data.num_channels`, so overriding the data's follows through to the model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from ml_collections import config_dict


def base_config() -> config_dict.ConfigDict:
    """Every field the CLIs read, at the DDPM paper's values (Ho et al. 2020, App. B)."""
    config = config_dict.ConfigDict()
    config.seed = 0

    config.data = dict(
        dataset="cifar10",  # "digits", "folder:<path>" or a tfds name
        image_size=32,
        num_channels=3,
        random_flip=True,
        data_dir="",  # tfds' data_dir; "" = tfds' default
        cache_in_memory=False,  # read the split into memory once instead of at every step
    )
    config.model = dict(
        name="unet",
        image_size=config.data.get_ref("image_size"),
        in_channels=config.data.get_ref("num_channels"),
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
        kernels="auto",  # models.layers.KERNELS: "xla" = plain Flax everywhere (forward-mode AD)
    )
    config.diffusion = dict(
        schedule="linear",  # beta_1 = 1e-4 ... beta_T = 0.02
        num_timesteps=1000,
        # Unset: the schedule's defaults for T (DDPM's 1e-4 and 0.02 scaled by 1000 / T).
        beta_start=config_dict.placeholder(float),
        beta_end=config_dict.placeholder(float),
        # diffusion.NOISE_CONDITIONINGS: "timestep" (t) or "sqrt_alpha_bar" (SR3's continuous
        # level, which lets sampling.schedule differ from the training schedule).
        noise_conditioning="timestep",
        parameterization="eps",
        var_type="fixed_large",  # sigma_t^2 = beta_t for sampling (Sec. 3.2)
        loss_type="simple",  # L_simple (eq. 14)
        hybrid_lambda=0.001,  # weight of L_vlb in the hybrid loss (improved DDPM)
    )
    config.optim = dict(
        optimizer="adam",
        lr=2e-4,
        warmup_steps=5000,
        lr_schedule="constant",
        grad_clip=1.0,
        ema_decay=0.9999,
        ema_warmup=False,  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    config.training = dict(
        objective="diffusion",  # training.OBJECTIVES: "diffusion" or "classifier" (guidance)
        batch_size=128,
        num_train_steps=800_000,
        log_every=100,
        checkpoint_every=10_000,
        sample_every=50_000,  # preview grids from the EMA parameters; 0 = never
        keep_checkpoints=2,
        num_preview_samples=64,
        nan_policy="stop",  # or "skip": drop the update and count it
        mixed_precision=False,  # bfloat16 activations, float32 parameters (GPU/TPU)
    )
    config.conditioning = dict(
        p_uncond=0.0,  # label dropout onto the null label (classifier-free guidance training)
        # degradations.DEGRADATIONS: the conditioning image made from each clean batch ("sr":
        # SR3's low-res input, "blur"); "" = none. model.cond_channels follows from it.
        degradation="",
        sr_factor=2,  # "sr": the low-res image is the high-res one averaged over f x f blocks
        blur_sigma=config_dict.placeholder(float),  # "blur": the Gaussian's sigma in pixels
        noise_std=0.0,  # Gaussian noise added to the observation, in [-1, 1] units
    )
    config.sampling = dict(
        sampler="ddpm",
        steps=1000,  # at most the sampling schedule's num_timesteps
        eta=0.0,
        clip_denoised=True,
        batch_size=256,
        guidance=0.0,  # classifier-free guidance weight w (class-conditional models; 0 = none)
        # The schedule the chain runs on (respaced to `steps`); name "" = the training schedule.
        # Another one needs diffusion.noise_conditioning="sqrt_alpha_bar".
        schedule=dict(
            name="",
            num_timesteps=0,
            beta_start=config_dict.placeholder(float),
            beta_end=config_dict.placeholder(float),
        ),
    )
    config.distributed = dict(
        coordinator_address="",  # "host:port" of process 0, or "auto" (TPU pods, SLURM)
        num_processes=1,
        process_id=0,
        initialization_timeout=300,  # seconds to wait for every process to join
        heartbeat_timeout=100,  # seconds of silence after which a process is declared dead
    )
    return config


def load_config(spec: str) -> config_dict.ConfigDict:
    """The config of `spec` = "path/to/file.py" or "path/to/file.py:arg", as `--config=spec`
    gives it to the CLIs: the file's get_config(arg)."""
    path, _, arg = str(spec).partition(":")
    if not Path(path).is_file():
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def override(config: config_dict.ConfigDict, values: Mapping[str, object]):
    """Set each dotted field of `values` ({"diffusion.schedule": "cosine"}) in place; a field
    that does not exist is a ValueError naming it. Returns config."""
    for field, value in values.items():
        *parents, name = field.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"no config field {field!r}")
            node = node[part]
        if name not in node:
            raise ValueError(f"no config field {field!r}")
        node[name] = value
    return config


def with_variants(config: config_dict.ConfigDict, arg: str | None, variants: Mapping[str, dict]):
    """`config` with the variants named in `arg` applied in order ("v,cosine"); None or "" is
    none. An unknown name is a ValueError listing the file's variants."""
    for name in filter(None, (arg or "").split(",")):
        if name not in variants:
            raise ValueError(
                f"unknown config variant {name!r}; this config has: {', '.join(variants)}"
            )
        override(config, variants[name])
    return config
