"""Input pipelines: host-local uint8 batches; the one place that scales pixels to [-1, 1]."""

from diffusion_jax.data.digits import load_digits
from diffusion_jax.data.scaling import to_model_range, to_uint8

__all__ = ["load_digits", "to_model_range", "to_uint8"]
