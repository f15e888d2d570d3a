"""Input pipelines: host-local uint8 batches; the one place that scales pixels to [-1, 1].

source = data.create_source(config.data, split="train")
it = data.create_batches(source, global_batch_size=..., seed=..., start_step=step,
                         process_index=..., process_count=..., random_flip=...)
"""

from diffusion_jax.data.cache import InMemorySource
from diffusion_jax.data.digits import DigitsSource, load_digits
from diffusion_jax.data.folder import FolderSource
from diffusion_jax.data.photos import PhotoPatchSource, load_photo_patches
from diffusion_jax.data.pipeline import create_batch_dataset, create_batches
from diffusion_jax.data.scaling import to_model_range, to_uint8
from diffusion_jax.data.sources import create_source

__all__ = [
    "DigitsSource",
    "FolderSource",
    "InMemorySource",
    "PhotoPatchSource",
    "create_batch_dataset",
    "create_batches",
    "create_source",
    "load_digits",
    "load_photo_patches",
    "to_model_range",
    "to_uint8",
]
