"""UNet: shapes, parameter count, conditioning paths, dropout, config and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.models import UNet, create_model
from diffusion_jax.models.layers import timestep_embedding

TINY = dict(
    name="unet",
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    image_size=8,
    in_channels=3,
    num_groups=8,
)
DDPM_CIFAR = dict(
    name="unet",
    ch=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    image_size=32,
    in_channels=3,
    dropout=0.1,
)


def tiny(**overrides):
    return create_model({**TINY, **overrides})


def inputs(model, batch=2, seed=0):
    s, c = model.image_size, model.in_channels
    x = jax.random.uniform(jax.random.key(seed), (batch, s, s, c), minval=-1.0, maxval=1.0)
    return x, jnp.arange(batch, dtype=jnp.int32) * 100


def random_params(model, *args, seed=0, **kwargs):
    """Random N(0, 0.1^2) params of the right shapes, drawn with numpy (real initialisation
    compiles a random-number program per parameter, which is slow on CPU). Also the DDPM
    initialisation zeroes conv_out, so a fresh model's output does not depend on its inputs."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_ddpm_cifar_parameter_count_matches_diffusers():
    # diffusers' UNet2DModel with the same layout has exactly 35,746,307 parameters.
    model = create_model(DDPM_CIFAR)
    x, t = inputs(model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
    assert count(shapes["params"]) == 35_746_307


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("out_channels", [None, 6])
def test_output_shape_and_dtypes(dtype, out_channels):
    model = tiny(dtype=dtype, out_channels=out_channels)
    x, t = inputs(model)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(model.apply, variables, x, t)
    assert out.shape == x.shape[:-1] + (out_channels or x.shape[-1],)
    assert out.dtype == jnp.float32


def test_ddpm_initialisation():
    # As in the original DDPM code: the last layer of every residual branch (ResnetBlock conv2,
    # attention to_out) and conv_out start at zero, so a fresh model outputs exactly 0.
    model = tiny()
    x, t = inputs(model)
    # unsafe_rbg compiles several times faster than threefry on CPU; init does not care.
    params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x, t)["params"]
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    zero = {k for k, v in flat.items() if not v.any()}
    biases_and_zero_init = {
        k
        for k in flat
        if k.endswith("bias") or "conv2/" in k or "to_out_0/" in k or k.startswith("conv_out/")
    }
    assert zero == biases_and_zero_init
    assert all(v.dtype == np.float32 for v in flat.values())


def test_timestep_embedding_closed_form():
    t = jnp.array([0, 1, 999], jnp.int32)
    dim, half = 8, 4
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = np.array([0.0, 1.0, 999.0])[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(timestep_embedding(t, dim), expected, atol=1e-4)
    np.testing.assert_array_equal(timestep_embedding(t, dim), timestep_embedding(t * 1.0, dim))
    assert timestep_embedding(t, 9).shape == (3, 9)
    # diffusers' UNet2DModel defaults: frequencies 10000 ** (-i / half), cos first.
    args = np.array([0.0, 1.0, 999.0])[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / half)
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"dim=8 with freq_shift=4; need dim // 2 > freq_shift"):
        timestep_embedding(t, dim, freq_shift=4)


def test_output_depends_on_t():
    model = tiny()
    x, _ = inputs(model, batch=1)
    x = jnp.concatenate([x, x])
    t = jnp.array([10, 900], jnp.int32)
    params = random_params(model, x, t)
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert not np.allclose(out[0], out[1], atol=1e-3)


def test_dropout_only_in_training():
    model = tiny(dropout=0.5, ch_mult=(1,), attn_resolutions=())  # one level: faster to compile
    x, t = inputs(model)
    params = random_params(model, x, t)
    variables = {"params": params}
    apply = jax.jit(model.apply, static_argnames="train")
    evaluation = apply(variables, x, t)
    rngs = {"dropout": jax.random.key(3)}
    np.testing.assert_array_equal(apply(variables, x, t, train=False, rngs=rngs), evaluation)
    train_a = apply(variables, x, t, train=True, rngs=rngs)
    train_b = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(train_a, evaluation, atol=1e-3)
    assert not np.allclose(train_a, train_b, atol=1e-3)


def test_class_embedding_changes_output():
    model = tiny(num_classes=10)
    x, _ = inputs(model, batch=1)
    x, t = jnp.concatenate([x, x]), jnp.array([50, 50], jnp.int32)
    y = jnp.array([3, 10], jnp.int32)  # 10 is the null label
    params = random_params(model, x, t, y=y)
    assert params["class_embedding"]["embedding"].shape == (11, 4 * TINY["ch"])
    out = jax.jit(model.apply)({"params": params}, x, t, y=y)
    assert not np.allclose(out[0], out[1], atol=1e-3)


def test_image_conditioning_changes_output():
    model = tiny(cond_channels=2)
    x, t = inputs(model)
    cond_image = jnp.ones(x.shape[:-1] + (2,))
    params = random_params(model, x, t, cond_image=cond_image)
    assert params["conv_in"]["kernel"].shape == (3, 3, 5, TINY["ch"])
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x, t, cond_image=cond_image)
    assert out.shape == x.shape
    assert not np.allclose(out, apply({"params": params}, x, t, cond_image=-cond_image), atol=1e-3)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(ch_mult=(1, 2, 2, 2), image_size=12), r"image_size=12 is not divisible by .*=8"),
        (dict(attn_resolutions=(16,)), r"attn_resolutions=\(16,\) contains \[16\].*\(8, 4\)"),
        (dict(ch=20), r"ch=20 is not divisible by num_groups=8"),
        (dict(ch=0), r"ch=0; must be a positive integer"),
        (dict(image_size=-8), r"image_size=-8; must be a positive integer"),
        (dict(num_res_blocks=0), r"num_res_blocks=0"),
        (dict(ch_mult=(1, 0)), r"ch_mult=\(1, 0\)"),
        (dict(ch_mult=()), r"ch_mult=\(\); must be a non-empty"),
        (dict(dropout=1.0), r"dropout=1.0; must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout=-0.1; must be in \[0, 1\)"),
        (dict(dtype="float16"), r"dtype='float16'; allowed: 'float32', 'bfloat16'"),
        (dict(downsample_padding="valid"), r"downsample_padding='valid'; allowed: 'same'"),
        (dict(num_heads=3), r"num_heads=3 does not divide the 32 channels"),
        (dict(num_head_channels=24), r"num_head_channels=24 does not divide"),
        (dict(num_classes=-1), r"num_classes=-1"),
        (dict(norm_eps=0.0), r"norm_eps=0.0; must be a positive number"),
        (dict(norm_eps="1e-5"), r"norm_eps='1e-5'; must be a positive number"),
        (dict(flip_sin_to_cos=1), r"flip_sin_to_cos=1; must be True or False"),
        (dict(freq_shift=8), r"freq_shift=8; must be a number below ch // 2 = 8"),
        (dict(freq_shift=None), r"freq_shift=None; must be a number below"),
        (dict(name="resnet"), r"name='resnet'; allowed: 'unet'"),
        (dict(chmult=(1, 2)), r"unknown field\(s\) \['chmult'\]"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_missing_field_and_direct_construction_are_checked():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['image_size'\]"):
        create_model({k: v for k, v in TINY.items() if k != "image_size"})
    fields = {k: v for k, v in TINY.items() if k != "name"}
    with pytest.raises(ValueError, match="dropout=2"):
        UNet(**fields, dropout=2)


def test_create_model_accepts_config_dict_with_lists():
    import ml_collections

    model = create_model(ml_collections.ConfigDict({**TINY, "ch_mult": [1, 2]}))
    assert isinstance(model, UNet) and model.ch_mult == (1, 2)


@pytest.mark.parametrize(
    "overrides, call, match",
    [
        ({}, lambda x, t: (x[0], t), r"x has shape \(8, 8, 3\); expected \(B, 8, 8, 3\)"),
        ({}, lambda x, t: (x[:, :4], t), r"x has shape \(2, 4, 8, 3\)"),
        ({}, lambda x, t: (x[..., :1], t), r"expected \(B, 8, 8, 3\)"),
        ({}, lambda x, t: (x, t[:1]), r"t has shape \(1,\); expected \(2,\)"),
        ({}, lambda x, t: (x, t[0]), r"t has shape \(\); expected \(2,\)"),
    ],
)
def test_input_validation(overrides, call, match):
    model = tiny(**overrides)
    x, t = inputs(model)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), *call(x, t))


def test_conditioning_input_validation():
    x, t = inputs(tiny())
    y = jnp.zeros((2,), jnp.int32)
    cond_image = jnp.zeros((2, 8, 8, 1))

    def init(model, **kwargs):
        jax.eval_shape(model.init, jax.random.key(0), x, t, **kwargs)

    with pytest.raises(ValueError, match=r"y \(class labels, shape \(2,\)\) is required"):
        init(tiny(num_classes=4))
    with pytest.raises(ValueError, match=r"y has shape \(1,\); expected \(2,\)"):
        init(tiny(num_classes=4), y=y[:1])
    with pytest.raises(ValueError, match="y was given but num_classes=0"):
        init(tiny(), y=y)
    with pytest.raises(ValueError, match=r"cond_image has shape None; expected \(2, 8, 8, 1\)"):
        init(tiny(cond_channels=1))
    with pytest.raises(ValueError, match=r"cond_image has shape \(2, 8, 8, 2\)"):
        init(tiny(cond_channels=1), cond_image=jnp.zeros((2, 8, 8, 2)))
    with pytest.raises(ValueError, match="cond_image was given but cond_channels=0"):
        init(tiny(), cond_image=cond_image)
