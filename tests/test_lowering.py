"""What a GPU or a TPU would compile: the train step and the sampling chain lowered for them on
this CPU-only machine.

JAX lowers a program for another platform without its hardware (`lowering_platforms`), so the
accelerators' programs are checked here, where no accelerator is. Under model.kernels='auto' (the
default) the CPU kernels of models/fast_cpu (`lax.platform_dependent`) must stay out of them: on
CUDA and TPU the program is the one of model.kernels='xla', plain Flax, every convolution
XLA's, in the forward pass and both gradients, and every reduction a standard one; forward-mode
autodiff lowers there. Under training.mixed_precision every convolution and matmul there has
a bfloat16 operand (none runs on two float32 ones). Each check also runs on the CPU lowering,
where the CPU-only paths must show, so that none of them can pass vacuously.
"""

import collections
import re

import jax
import numpy as np
import pytest
from train_harness import tiny_config

from diffusion_jax import models, samplers, training

# Two levels, attention at 4x4, dropout: every kind of layer of the CIFAR-10 UNet.
LAYERS = {
    "model.ch_mult": (1, 2),
    "model.attn_resolutions": (4,),
    "model.dropout": 0.1,
}
ACCELERATORS = ("cuda", "tpu")


def lowered_step(mixed: bool, platforms, kernels: str = "auto") -> tuple[dict, dict]:
    """({platform: StableHLO text of the train step}, params)."""
    config = tiny_config({**LAYERS, "training.mixed_precision": mixed, "model.kernels": kernels})
    model = models.create_model(training.model_config(config))
    optimizer, lr = training.make_optimizer(config)
    step = training.make_train_step(model, training.make_schedule(config), config, optimizer, lr)
    state = jax.eval_shape(
        lambda k: training.init_state(model, optimizer, config, k), jax.random.key(0)
    )
    images = jax.ShapeDtypeStruct((8, 8, 8, 1), np.uint8)
    traced = jax.jit(step).trace(state, images, jax.eval_shape(lambda: jax.random.key(1)))
    texts = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in platforms}
    return texts, state.params


def conv_kernels(params) -> list:
    """The kernels of every convolution, 3x3 and 1x1: plain Flax's are all XLA convolutions."""
    return [w for w in jax.tree.leaves(params) if w.ndim == 4]


def ops(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if f"stablehlo.{name}" in line]


def operand_dtypes(line: str) -> tuple[str, str]:
    lhs, rhs = re.search(r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) ->", line).groups()
    return lhs, rhs


def test_accelerators_get_xla_convolutions_and_standard_reducers():
    texts, params = lowered_step(False, ("cpu", *ACCELERATORS))
    # The forward pass and both gradients of each; the first layer's input (x_t) has no
    # gradient.
    expected_convolutions = 3 * len(conv_kernels(params)) - 1
    for platform in ACCELERATORS:
        text = texts[platform]
        assert len(ops(text, "convolution")) == expected_convolutions, platform
        winograd = [ln for ln in ops(text, "dot_general") if "tensor<36x" in ln]
        assert not winograd, platform
        assert all("applies stablehlo." in ln for ln in ops(text, "reduce(")), platform

    cpu = texts["cpu"]
    assert len(ops(cpu, "convolution")) < expected_convolutions
    assert [ln for ln in ops(cpu, "dot_general") if "tensor<36x" in ln]
    assert not all("applies stablehlo." in ln for ln in ops(cpu, "reduce("))


def test_mixed_precision_convolutions_and_matmuls_are_bfloat16_on_accelerators():
    texts, _ = lowered_step(True, ACCELERATORS)
    for platform, text in texts.items():
        products = ops(text, "convolution") + ops(text, "dot_general")
        assert len(products) > 50, platform
        float32 = [ln for ln in products if operand_dtypes(ln) == ("f32", "f32")]
        assert not float32, (platform, float32[:2])
        assert all(operand_dtypes(ln) == ("bf16", "bf16") for ln in ops(text, "convolution"))


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed"])
def test_sampling_chain_on_accelerators_is_xla_convolutions_in_one_loop(mixed):
    """The DDPM chain (a traced step count, so a while loop): on CUDA and TPU each
    convolution once, as XLA's convolution (bfloat16 under mixed precision); on CPU in float32,
    Winograd's products instead."""
    config = tiny_config({**LAYERS, "training.mixed_precision": mixed})
    model = models.create_model(training.model_config(config))
    optimizer, _ = training.make_optimizer(config)
    params = jax.eval_shape(
        lambda k: training.init_state(model, optimizer, config, k), jax.random.key(0)
    ).params
    schedule = training.make_schedule(config)

    def chain(params, num_steps, key):
        def denoise_fn(x, t):
            return model.apply({"params": params}, x, t, train=False)

        padded = samplers.prepare_schedule(schedule, schedule.num_timesteps)
        x_T = jax.random.normal(key, (8, 8, 8, 1))
        return samplers.run_chain(denoise_fn, padded, num_steps, x_T, key)["sample"]

    key = jax.eval_shape(lambda: jax.random.key(1))
    traced = jax.jit(chain).trace(params, jax.ShapeDtypeStruct((), np.int32), key)
    num_kernels = len(conv_kernels(params))
    for platform in ACCELERATORS:
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert len(ops(text, "while")) == 1, platform
        convolutions = ops(text, "convolution")
        assert len(convolutions) == num_kernels, platform
        assert not [ln for ln in ops(text, "dot_general") if "tensor<36x" in ln], platform
        if mixed:
            assert all(operand_dtypes(ln) == ("bf16", "bf16") for ln in convolutions), platform
    if not mixed:
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
        assert len(ops(cpu, "convolution")) < num_kernels
        assert [ln for ln in ops(cpu, "dot_general") if "tensor<36x" in ln]


def op_counts(text: str) -> collections.Counter:
    """How many of each StableHLO op, less the traces of a pruned `lax.platform_dependent`: a
    `case` on a constant index around the one branch lowered, its constants and returns, and the
    zero broadcasts that stand for the pruned branch's residuals (unused, so XLA drops them)."""
    names = re.findall(r"stablehlo\.(\w+)", text)
    pruned = ("case", "return", "constant", "broadcast_in_dim")
    return collections.Counter(n for n in names if n not in pruned)


def test_auto_on_accelerators_is_the_plain_flax_program():
    auto, _ = lowered_step(False, ACCELERATORS)
    xla, _ = lowered_step(False, ACCELERATORS, kernels="xla")
    for platform in ACCELERATORS:
        got, want = op_counts(auto[platform]), op_counts(xla[platform])
        assert got == want, (platform, got - want, want - got)


def test_forward_mode_with_auto_lowers_on_accelerators_and_is_refused_on_cpu():
    config = tiny_config({**LAYERS, "model.kernels": "auto"})
    model = models.create_model(training.model_config(config))
    x = jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32)
    t = jax.ShapeDtypeStruct((8,), np.int32)
    params = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), x, t)["params"]

    def jvp(params, x, t):
        return jax.jvp(lambda x: model.apply({"params": params}, x, t), (x,), (x,))

    traced = jax.jit(jvp).trace(params, x, t)
    for platform in ACCELERATORS:
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        # each convolution and its tangent
        assert len(ops(text, "convolution")) == 2 * len(conv_kernels(params)), platform
    with pytest.raises(TypeError, match="model.kernels='fast_cpu', or 'auto' on CPU"):
        traced.lower(lowering_platforms=("cpu",))
