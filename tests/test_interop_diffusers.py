"""Cross-implementation: diffusers' UNet2DModel and our UNet agree given the same weights."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion_jax.interop.diffusers import (
    WEIGHTS_FILE,
    diffusers_config_from_unet,
    load_unet2d,
    unet_config_from_diffusers,
)
from diffusion_jax.models.layers import timestep_embedding

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.interop

DDPM_CIFAR = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
)
# Single-head attention and TF-style "same" downsampling (as in the original DDPM checkpoints),
# attention on both levels (mid block too), out_channels = 2 * in_channels (learned variance).
SMALL = dict(
    sample_size=16,
    in_channels=3,
    out_channels=6,
    block_out_channels=(32, 64),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    attention_head_dim=None,
    downsample_padding=0,
)
# diffusers' unconditional training example (examples/unconditional_image_generation) at a
# sixteenth of its widths: its six levels with attention at the fifth, two resnets per level,
# and every other option at UNet2DModel's defaults: norm_eps 1e-5, freq_shift 0,
# flip_sin_to_cos True, attention_head_dim 8 (8 heads of 8 at 64 channels), downsample_padding 1.
EXAMPLE = dict(
    sample_size=32,
    block_out_channels=(16, 16, 32, 32, 64, 64),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=8,
)
# Several heads (attention_head_dim 8: 4 heads at 32 channels, 8 at 64) and diffusers' defaults
# for the GroupNorm epsilon and the timestep embedding.
HEADS = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)


def save_diffusers(kwargs, path):
    """A UNet2DModel with random weights, saved to `path`. PyTorch's initialisation draws the
    conv, linear and embedding weights; the biases and GroupNorm scales, which it sets to 0 and 1,
    are perturbed by N(0, 0.1^2), so that a mapping error in any of them changes the output."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_unet2d")
    save_diffusers(SMALL, path)
    return path


def edited_copy(src, dst, edit):
    """Copy a diffusers folder, applying edit(tensors) to its weights."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, dst / WEIGHTS_FILE)
    return dst


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999], np.float32)
    for dim, flip, shift in [(128, False, 1), (33, False, 1), (128, True, 0), (33, True, 0)]:
        for ts in (t.astype(np.int64), t + 0.25):
            expected = get_timestep_embedding(
                torch.from_numpy(ts), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
            ).numpy()
            # float32 t * f near t = 1000 is rounded to ~6e-5 (an ulp of 1000), and torch's and
            # XLA's float32 exp differ by an ulp for some frequencies: agreement to ~1e-4.
            actual = timestep_embedding(jnp.asarray(ts), dim, flip, shift)
            np.testing.assert_allclose(actual, expected, atol=1e-4)


def max_difference(reference, model, params, batch, labels=None):
    """max |ours - diffusers'| over a batch of random images and timesteps (and class labels)."""
    generator = torch.Generator().manual_seed(1)
    s, c = model.image_size, model.in_channels
    x = torch.rand(batch, c, s, s, generator=generator) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=generator)
    with torch.no_grad():
        expected = reference(x, t, class_labels=labels).sample.numpy()
    y = None if labels is None else jnp.asarray(labels.numpy())
    out = jax.jit(model.apply)(
        {"params": params},
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(t.numpy()),
        y=y,
    )
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == expected.shape
    return np.abs(out - expected).max()


# Both sides compute in float32 through 20 to 80 layers (convs, GroupNorms, softmax attention)
# on outputs of order 1; summation order differs, so agreement is to float32 rounding error
# accumulated over that depth: measured 8e-7 to 7.3e-6 here, and 3e-5 leaves 4x headroom for
# other BLAS and XLA versions. Mapping errors show up at order 1e-1 (an ignored freq_shift or
# flip_sin_to_cos); the smallest one checked, GroupNorm's epsilon 1e-6 in place of diffusers'
# 1e-5, moves these outputs by 6e-5 (heads) to 1.8e-4 (diffusers_example), and by 0.68 at
# norm_eps 0.1 (large_eps).
TOLERANCE = 3e-5


@pytest.mark.parametrize(
    "kwargs, batch, kernels",
    [
        (SMALL, 4, "auto"),
        pytest.param(DDPM_CIFAR, 2, "auto", marks=pytest.mark.slow),
        (EXAMPLE, 3, "auto"),
        (HEADS, 4, "xla"),
        ({**HEADS, "norm_eps": 0.1}, 4, "auto"),
    ],
    ids=["small", "ddpm_cifar", "diffusers_example", "heads", "large_eps"],
)
def test_load_unet2d_matches_diffusers(kwargs, batch, kernels, tmp_path):
    """Our forward on the imported weights is diffusers' forward. "auto" computes with the
    fast_cpu kernels on CPU, "xla" with plain Flax layers: each reads norm_eps."""
    reference = save_diffusers(kwargs, tmp_path)
    model, params = load_unet2d(tmp_path)
    assert max_difference(reference, model.clone(kernels=kernels), params, batch) <= TOLERANCE


def test_class_conditional_import_matches_diffusers(tmp_path):
    kwargs = {**HEADS, "num_class_embeds": 5}
    reference = save_diffusers(kwargs, tmp_path)
    model, params = load_unet2d(tmp_path)
    assert model.num_classes == 5
    model = model.clone(kernels="xla")  # plain Flax layers compile faster on CPU
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    assert max_difference(reference, model, params, 6, labels) <= TOLERANCE
    # The null label 5 adds a zero row: diffusers' forward without its class embedding.
    np.testing.assert_array_equal(params["class_embedding"]["embedding"][5], 0.0)
    reference.class_embedding = None
    unconditional = lambda x, t, class_labels: reference(x, t)  # noqa: E731
    assert max_difference(unconditional, model, params, 6, torch.full((6,), 5)) <= TOLERANCE


def test_workdir_config_builds_the_imported_network():
    from diffusion_jax.interop.diffusers import (
        DEFAULT_BASE_CONFIG,
        _load_config_file,
        workdir_config,
    )
    from diffusion_jax.models import create_model
    from diffusion_jax.training import model_config

    unet = unet_config_from_diffusers(EXAMPLE)
    config = workdir_config(unet, _load_config_file(DEFAULT_BASE_CONFIG), "cifar10")
    imported = create_model(unet)
    assert create_model(model_config(config)) == imported
    assert (imported.norm_eps, imported.flip_sin_to_cos, imported.freq_shift) == (1e-5, True, 0)


def test_class_conditional_import_is_refused_as_a_workdir(tmp_path):
    from diffusion_jax.cli import UserError
    from diffusion_jax.interop.diffusers import import_to_workdir

    save_diffusers({**HEADS, "num_class_embeds": 3}, tmp_path / "unet")
    with pytest.raises(UserError, match=r"num_class_embeds=3: a class-conditional UNet imports"):
        import_to_workdir(tmp_path / "unet", tmp_path / "workdir")
    assert not (tmp_path / "workdir" / "config.json").exists()


def test_legacy_attention_names(small_dir, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        for key in list(tensors):
            for new, old in legacy.items():
                if f".{new}." in key:
                    tensors[key.replace(f".{new}.", f".{old}.")] = tensors.pop(key)

    _, params = load_unet2d(small_dir)
    _, legacy_params = load_unet2d(edited_copy(small_dir, tmp_path / "legacy", rename))
    jax.tree.map(np.testing.assert_array_equal, params, legacy_params)


def _set(key, value):
    def edit(tensors):
        tensors[key] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            _set("conv_in.weight", np.zeros((32, 4, 3, 3), np.float32)),
            r"tensor 'conv_in.weight' has shape \(32, 4, 3, 3\); the model built from "
            r"config.json expects \(32, 3, 3, 3\)",
        ),
        (lambda tensors: tensors.pop("conv_out.bias"), r"missing tensor\(s\) \['conv_out.bias'\]"),
        (
            _set("extra.weight", np.zeros(3, np.float32)),
            r"not used by the model: \['extra\.weight'\]",
        ),
        (
            _set("mid_block.attentions.0.query.weight", np.zeros((64, 64), np.float32)),
            r"both 'mid_block.attentions.0.to_q.weight' and 'mid_block.attentions.0.query.weight'",
        ),
    ],
    ids=["wrong_shape", "missing", "unused", "duplicate"],
)
def test_bad_weights_give_clear_errors(small_dir, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_unet2d(edited_copy(small_dir, tmp_path / "edited", edit))


def test_missing_files_give_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sample_size": 32}))
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model.safetensors not found"):
        load_unet2d(tmp_path)


def test_published_ddpm_cifar_config_mapping():
    # The keys of the published DDPM CIFAR-10 UNet2DModel config that differ from defaults.
    cfg = {
        "_class_name": "UNet2DModel",
        **DDPM_CIFAR,
        "attention_head_dim": None,
        "downsample_padding": 0,
        "norm_num_groups": 32,
    }
    assert unet_config_from_diffusers(cfg) == {
        "name": "unet",
        "ch": 128,
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (16,),
        "image_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "dropout": 0.0,
        "resamp_with_conv": True,
        "downsample_padding": "same",
        "num_groups": 32,
        "norm_eps": 1e-6,
        "num_heads": 1,
        "num_head_channels": None,
        "flip_sin_to_cos": False,
        "freq_shift": 1.0,
        "num_classes": 0,
    }


def test_diffusers_defaults_config_mapping():
    # The example's layout at full width, every other option at UNet2DModel's defaults.
    full = {**EXAMPLE, "block_out_channels": (128, 128, 256, 256, 512, 512), "sample_size": 64}
    del full["norm_num_groups"]
    ours = unet_config_from_diffusers(full)
    assert (ours["ch"], ours["ch_mult"]) == (128, (1, 1, 2, 2, 4, 4))
    assert ours["attn_resolutions"] == (4,)
    assert (ours["norm_eps"], ours["flip_sin_to_cos"], ours["freq_shift"]) == (1e-5, True, 0.0)
    assert (ours["num_head_channels"], ours["downsample_padding"]) == (8, "symmetric")


@pytest.mark.parametrize(
    "kwargs", [SMALL, DDPM_CIFAR, EXAMPLE, HEADS], ids=["small", "ddpm_cifar", "example", "heads"]
)
def test_diffusers_config_from_unet_inverts_the_import_mapping(kwargs):
    ours = unet_config_from_diffusers(kwargs)
    theirs = diffusers_config_from_unet(ours)
    assert unet_config_from_diffusers(theirs) == ours
    # The network UNet2DModel builds from it has our parameter count, tensor for tensor.
    model = diffusers.UNet2DModel(**theirs)
    _, params = load_unet2d_from_model(model, ours)
    n_ours = sum(p.size for p in jax.tree.leaves(params))
    assert n_ours == sum(p.numel() for p in model.parameters())


def load_unet2d_from_model(model, ours):
    """Our (model, params) converted from an in-memory UNet2DModel via its state dict."""
    from diffusion_jax.interop.diffusers import convert_unet2d_state_dict
    from diffusion_jax.models import create_model

    net = create_model(ours)
    size, c = ours["image_size"], ours["in_channels"]
    abstract = jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros((1, size, size, c)), jnp.zeros((1,), int))
    )["params"]
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return net, convert_unet2d_state_dict(tensors, abstract)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_classes=10), r"num_classes=10 has no UNet2DModel form"),
        (dict(num_heads=4), r"num_heads=4; UNet2DModel sets heads"),
    ],
)
def test_diffusers_config_from_unet_refuses_what_unet2d_lacks(change, match):
    with pytest.raises(ValueError, match=match):
        diffusers_config_from_unet({**unet_config_from_diffusers(SMALL), **change})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(flip_sin_to_cos=1), r"flip_sin_to_cos=1; allowed: True or False"),
        (dict(norm_eps=0), r"norm_eps=0; allowed: a positive number"),
        (dict(freq_shift=64), r"freq_shift=64; allowed: a number below .* \(64\)"),
        (
            dict(attention_head_dim=96),
            r"attention_head_dim=96 is not supported; allowed: None or a positive integer "
            r"dividing the widths of the attention blocks \[256\]",
        ),
        (dict(num_class_embeds=0), r"num_class_embeds=0; allowed: None or a positive integer"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep' is not supported"),
        (
            dict(resnet_time_scale_shift="scale_shift"),
            r"resnet_time_scale_shift='scale_shift' is not supported; allowed: 'default'",
        ),
        (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier' is not supported"),
        (
            dict(down_block_types=("CrossAttnDownBlock2D",) * 4),
            r"down block type 'CrossAttnDownBlock2D' is not supported",
        ),
        (dict(up_block_types=("UpBlock2D",) * 4), r"not mirrored"),
        (dict(block_out_channels=(128, 192, 256, 256)), r"not all multiples of the first"),
        (dict(sample_size=(32, 64)), r"only square images"),
        (dict(foo=1), r"unsupported key\(s\) \['foo'\]"),
        (dict(_class_name="UNet2DConditionModel"), r"only UNet2DModel"),
    ],
)
def test_unsupported_diffusers_configs(change, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**DDPM_CIFAR, **change})
