"""Importers for published checkpoints (diffusers' UNet2DModel)."""

from diffusion_jax.interop.diffusers import load_unet2d, unet_config_from_diffusers

__all__ = ["load_unet2d", "unet_config_from_diffusers"]
