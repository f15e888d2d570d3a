"""Importers for published checkpoints (diffusers' UNet2DModel).

The names are resolved on first use, so that `python -m diffusion_jax.interop.diffusers` does
not find its own module already imported by this package (runpy warns about that).
"""

import importlib

__all__ = ["load_unet2d", "unet_config_from_diffusers"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("diffusion_jax.interop.diffusers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
