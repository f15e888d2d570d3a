"""training.mixed_precision: bfloat16 compute, float32 parameters, EMA and optimizer state.

The loss of one step is compared with the float32 step on the same batch and keys: bfloat16
keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per operation), and the tiny UNet chains
about a dozen rounded layers, so the two losses agree to a few percent; 5% is the stated bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_harness import tiny_config

from diffusion_jax import models, training


def one_step(mixed: bool):
    config = tiny_config({"training.mixed_precision": mixed})
    model = models.create_model(training.model_config(config))
    optimizer, lr = training.make_optimizer(config)
    step = training.make_train_step(model, training.make_schedule(config), config, optimizer, lr)
    state = jax.jit(lambda k: training.init_state(model, optimizer, config, k))(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), np.uint8)
    jaxpr = str(jax.make_jaxpr(step)(state, images, jax.random.key(1)))
    new_state, metrics = jax.jit(step)(state, images, jax.random.key(1))
    return model, new_state, metrics, jaxpr


@pytest.mark.slow
def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_state():
    model, state, metrics, jaxpr = one_step(mixed=True)
    assert model.dtype == "bfloat16"
    assert "bf16[8,8,8,32]" in jaxpr  # activations of the first conv are bfloat16
    for tree in (state.params, state.ema_params, state.opt_state):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}
    assert bool(metrics["finite"])

    _, _, ref_metrics, ref_jaxpr = one_step(mixed=False)
    assert "bf16" not in ref_jaxpr
    loss, ref = float(metrics["loss"]), float(ref_metrics["loss"])
    assert abs(loss - ref) < 0.05 * ref, (loss, ref)
