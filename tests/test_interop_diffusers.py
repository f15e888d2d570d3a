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


def save_diffusers(kwargs, path):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**kwargs).eval()
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
    for dim in (128, 33):
        for ts in (t.astype(np.int64), t + 0.25):
            expected = get_timestep_embedding(
                torch.from_numpy(ts), dim, flip_sin_to_cos=False, downscale_freq_shift=1
            ).numpy()
            # float32 t * f near t = 1000 is rounded to ~6e-5 (an ulp of 1000), and torch's and
            # XLA's float32 exp differ by an ulp for some frequencies: agreement to ~1e-4.
            actual = timestep_embedding(jnp.asarray(ts), dim)
            np.testing.assert_allclose(actual, expected, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, batch", [(SMALL, 4), (DDPM_CIFAR, 2)], ids=["small", "ddpm_cifar"]
)
def test_load_unet2d_matches_diffusers(kwargs, batch, tmp_path):
    reference = save_diffusers(kwargs, tmp_path)
    model, params = load_unet2d(tmp_path)

    generator = torch.Generator().manual_seed(1)
    s, c = kwargs["sample_size"], kwargs.get("in_channels", 3)
    x = torch.rand(batch, c, s, s, generator=generator) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=generator)
    with torch.no_grad():
        expected = reference(x, t).sample.numpy()
    out = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy())
    )
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == expected.shape
    # Both sides compute in float32 through ~35 layers (convs, GroupNorms, softmax attention) on
    # outputs of order 1; summation order differs, so agreement is to float32 rounding error
    # accumulated over that depth (measured ~5e-6); 1e-4 would still catch any mapping error,
    # which shows up at order 1e-2 or more.
    assert np.abs(out - expected).max() <= 1e-4


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
        "num_heads": 1,
        "num_head_channels": None,
    }


@pytest.mark.parametrize("kwargs", [SMALL, DDPM_CIFAR], ids=["small", "ddpm_cifar"])
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
        (dict(flip_sin_to_cos=True), r"flip_sin_to_cos=True is not supported; allowed: False"),
        (dict(norm_eps=1e-5), r"norm_eps=1e-05 is not supported"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep' is not supported"),
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
