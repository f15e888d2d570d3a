"""The perceptual distance (metrics.perceptual): LPIPS's formula, recomputed in torch on the
TorchScript InceptionV3 that the Flax weights are converted from, and the evaluate CLI's
--metric=perceptual for single samples and means of k."""

import numpy as np
import pytest
from test_inception import _torch, random_torchscript_inception

from diffusion_jax import evaluate
from diffusion_jax.metrics import perceptual as perceptual_lib
from diffusion_jax.metrics.convert_inception import layer_map

# The Flax and torch networks agree to ~1e-6 of the feature scale (test_inception, REL_TOL
# 1e-4 there); unit-normalised features of two unrelated images differ by O(1), so their
# squared differences, averaged over positions and summed over layers, agree to the same
# relative order. 1e-3 leaves room for the sum; a wrong layer, normalisation axis or mean
# moves the distance by far more.
REL_TOL = 1e-3


def torch_lpips_form(module, x_uint8, y_uint8) -> np.ndarray:
    """sum over LAYERS of the spatial mean of ||unit(f(x)) - unit(f(y))||^2, in torch."""
    torch = _torch()
    top = {path[0]: key.split(".")[2] for key, path in layer_map().items()}  # Mixed_5d -> mixed_2
    wanted = {top[name] for name in perceptual_lib.LAYERS}

    def features(images):
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = torch.nn.functional.interpolate(
            x, size=(299, 299), mode="bilinear", align_corners=False
        )
        out = {}
        for name, layer in module.net.layers.named_children():
            if name == "pool2":
                break
            x = layer(x)
            if name in wanted:
                out[name] = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + 1e-10)
        return out

    with torch.no_grad():
        fx, fy = features(x_uint8), features(y_uint8)
        total = sum(((fx[n] - fy[n]) ** 2).sum(dim=1).mean(dim=(1, 2)) for n in wanted)
    assert len(wanted) == len(perceptual_lib.LAYERS)
    return total.numpy()


def test_matches_lpips_form_in_torch():
    module, variables = random_torchscript_inception()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    want = torch_lpips_form(module, x, y)
    got = perceptual_lib.perceptual_distance(variables, x, y, batch_size=3)  # a padded batch
    assert want.min() > 0.1  # O(1) distances, not a degenerate zero
    np.testing.assert_allclose(got, want, rtol=REL_TOL)
    # Identical images are at 0; the distance is symmetric; grayscale is scored as RGB.
    np.testing.assert_allclose(perceptual_lib.perceptual_distance(variables, x, x), 0, atol=1e-6)
    np.testing.assert_allclose(perceptual_lib.perceptual_distance(variables, y, x), got, rtol=1e-5)
    gray = perceptual_lib.perceptual_distance(variables, x[..., :1], y[..., :1])
    rgb = perceptual_lib.perceptual_distance(
        variables, x[..., :1].repeat(3, -1), y[..., :1].repeat(3, -1)
    )
    np.testing.assert_allclose(gray, rgb, rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        perceptual_lib.perceptual_distance(variables, x, y[:2])


def test_evaluate_scores_single_samples_and_means_of_k(tmp_path, monkeypatch):
    _, variables = random_torchscript_inception()
    monkeypatch.setattr(perceptual_lib, "load_inception_params", lambda: variables)
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    index = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "hr.npz", images=refs)
    np.savez(tmp_path / "out.npz", images=samples, reference_index=index)
    record = evaluate.evaluate_image_quality(
        "perceptual", samples=tmp_path / "out.npz", reference=tmp_path / "hr.npz"
    )
    single = perceptual_lib.perceptual_distance(variables, samples, refs[index])
    np.testing.assert_allclose(record["per_image"], single, rtol=1e-6)
    means = np.stack([samples[index == i].astype(np.float64).mean(0) for i in range(2)])
    mean_of_k = perceptual_lib.perceptual_distance(variables, means, refs)
    np.testing.assert_allclose(record["mean_of_k"]["per_image"], mean_of_k, rtol=1e-6)
    assert record["samples_per_reference"] == 2
