"""Flax modules only: they know nothing about diffusion. Build one with create_model(config)."""

import dataclasses
from collections.abc import Mapping

from diffusion_jax.models.classifier import Classifier
from diffusion_jax.models.refiner import Refiner
from diffusion_jax.models.unet import UNet

# The one table of model names (config.model.name): denoisers (a UNet, or a predict-and-refine
# Refiner) and noisy classifiers.
MODELS = {"unet": UNet, "refiner": Refiner, "classifier": Classifier}


def create_model(model_config):
    """Build the model named by model_config.name from a dict or ml_collections ConfigDict.

    The other keys are the module's fields (see UNet, Classifier); lists become tuples. Unknown
    names or fields raise ValueError listing what is allowed; field values are checked here,
    before any compilation.
    """
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else model_config
    if not isinstance(cfg, Mapping):
        raise ValueError(f"create_model: expected a dict or ConfigDict, got {type(cfg).__name__}")
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"create_model: name={name!r}; allowed: {', '.join(map(repr, MODELS))}")
    cls = MODELS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ValueError(
            f"create_model: unknown field(s) {unknown} for {name!r}; allowed: {sorted(fields)}"
        )
    required = [
        k
        for k, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"create_model: {name!r} config is missing required field(s) {missing}")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return cls(**cfg)


__all__ = ["MODELS", "Classifier", "Refiner", "UNet", "create_model"]
