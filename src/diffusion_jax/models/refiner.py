"""Predict-and-refine (Whang et al. 2022, "Deblurring via Stochastic Refinement"): a
deterministic predictor g and a denoiser of the residual x - g(y).

`predict(net, y)` is the regression form both the predictor here and a plain regression UNet
(training objective "regression") use: the network sees the conditioning image y alone (as its
input, at t = 0) and adds its output to y, so an untrained network (zero-initialised output)
predicts y itself.

`Refiner` is a UNet (the denoiser: every UNet field means the same here) with a second, smaller
UNet inside, the predictor, of width predictor_ch, multipliers predictor_ch_mult and
predictor_num_res_blocks blocks per level (its other fields are the denoiser's, without class or
image conditioning). cond_channels is the channel count of y: the denoiser sees y and g(y)
concatenated (2 * cond_channels channels). Parameters: {"denoiser": ..., "predictor": ...}.
"""

import dataclasses

import jax.numpy as jnp

from diffusion_jax.models.unet import UNet, check_unet_fields


def predict(net, y, train: bool = False):
    """The regression estimate of x from its conditioning image y (B, H, W, C): y + net(y, 0)."""
    t = jnp.zeros((y.shape[0],), jnp.int32)
    return y + net(y, t, train=train)


_UNET_FIELDS = tuple(f.name for f in dataclasses.fields(UNet) if f.name not in ("parent", "name"))


class Refiner(UNet):
    """x_t (B, H, W, in_channels), t (B,) and cond_image y (B, H, W, cond_channels) -> the
    denoiser's output for the residual x - g(y), given y and g(y). `prediction` (g(y), from
    `predict_clean`) may be passed in so that a chain computes it once, not at every step."""

    predictor_ch: int = 32
    predictor_ch_mult: tuple[int, ...] = (1, 2, 2)
    predictor_num_res_blocks: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not self.cond_channels:
            raise ValueError("Refiner: cond_channels=0; the refiner needs a conditioning image")
        check_unet_fields(self._predictor_config())

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in _UNET_FIELDS}

    def _predictor_config(self) -> UNet:
        return UNet(
            **dict(
                self._fields(),
                ch=self.predictor_ch,
                ch_mult=tuple(self.predictor_ch_mult),
                num_res_blocks=self.predictor_num_res_blocks,
                in_channels=self.cond_channels,
                out_channels=None,
                num_classes=0,
                cond_channels=0,
            ),
            parent=None,
        )

    def setup(self):
        self.predictor = self._predictor_config().clone(parent=self, name="predictor")
        self.denoiser = UNet(
            **dict(self._fields(), cond_channels=2 * self.cond_channels), name="denoiser"
        )

    def predict_clean(self, cond_image, train: bool = False):
        """g(y): the predictor's estimate of the clean image (`predict`)."""
        return predict(self.predictor, cond_image, train)

    def __call__(self, x, t, train: bool = False, y=None, cond_image=None, prediction=None):
        if cond_image is None:
            raise ValueError("Refiner: cond_image (the conditioning image y) is required")
        if prediction is None:
            prediction = self.predict_clean(cond_image, train)
        both = jnp.concatenate([cond_image, prediction.astype(cond_image.dtype)], axis=-1)
        return self.denoiser(x, t, train=train, y=y, cond_image=both)
