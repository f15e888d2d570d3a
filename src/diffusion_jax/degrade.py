"""Write the observations an image-conditioned model samples from: `python -m
diffusion_jax.degrade --workdir=W (or --config=C.py[:variant]) [--split=test]
--output=OBS.npz --reference=CLEAN.npz [--baseline=INPUT.npz --num_examples=N --seed=S]`.

Reads the split of the model's data (default the held-out "test"), degrades every image with the
config's conditioning.degradation (degradations.observe_uint8: for SR3's "sr" the uint8 image
averaged over sr_factor x sr_factor blocks; for "blur" the blurred image) and writes
OBS.npz (`images` uint8, what `sample --condition` reads) and CLEAN.npz (`images` uint8, the
ground truth that `evaluate --metric=psnr|ssim --reference` reads), in the split's order, with
a PNG of each beside them. INPUT.npz (optional) holds the conditioning image the network sees,
as uint8 at full size: for "sr" the bicubic upsampling of the low-res image, for "blur" the
blurred image itself; scored like samples, it is the input-alone baseline. The observation
noise (noise_std > 0) is drawn from --seed. Prints one JSON line; bad input is one `error:`
line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import cli, data, degradations, generate, grid
from diffusion_jax.config import load_config as load_config_file
from diffusion_jax.data import to_uint8
from diffusion_jax.metrics.cache import save_tree
from diffusion_jax.workdir import load_config as load_workdir_config


def observations(config, split: str, num_examples: int | None = None, seed: int = 0):
    """(observations uint8 (N, h, w, C), clean images uint8 (N, H, W, C)) of the first N
    examples (default all) of `split` of config.data, under config.conditioning."""
    name = degradations.configured(config)
    if not name:
        raise cli.UserError("this config has no conditioning.degradation to observe with")
    try:
        source = data.create_source(config.data, split=split)
    except (ValueError, OSError, RuntimeError) as e:
        raise cli.UserError(f"config.data.dataset={config.data.dataset!r}: {e}") from None
    n = len(source) if num_examples is None else num_examples
    if not 1 <= n <= len(source):
        raise cli.UserError(f"--num_examples={n}: expected 1 to {len(source)} (split {split!r})")
    clean = np.stack([source[i]["image"] for i in range(n)])
    observed = degradations.observe_uint8(name, clean, config.conditioning, jax.random.key(seed))
    return observed, clean


def run(
    output, reference, *, config, split="test", num_examples=None, seed=0, baseline=None
) -> dict:
    """Write OBS.npz (`output`), CLEAN.npz (`reference`) and INPUT.npz (`baseline`, optional)
    with their PNGs; the JSON record."""
    observed, clean = observations(config, split, num_examples, seed)
    record = dict(degradation=degradations.configured(config), split=split, seed=seed)
    files = [(Path(output), observed), (Path(reference), clean)]
    if baseline is not None:
        seen = generate.condition_images(config, observed)
        files.append((Path(baseline), to_uint8(seen)))
        record["baseline"] = str(baseline)
    for path, images in files:
        if path.suffix != ".npz":
            raise cli.UserError(f"{path}: expected a file name ending in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tree(path, {"images": images})
        grid.save_grid(images[:100], path.with_suffix(".png"))
    return dict(record, output=str(output), reference=str(reference), num_examples=len(clean))


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A workdir whose config.json names the degradation.")
    flags.DEFINE_string("config", None, "Or a config file (path.py or path.py:variant).")
    flags.DEFINE_string("split", "test", "The data split to degrade (default the held-out test).")
    flags.DEFINE_string("output", None, "The observations' .npz (what sample --condition reads).")
    flags.DEFINE_string("reference", None, "The clean images' .npz (evaluate --reference).")
    flags.DEFINE_string("baseline", None, "The conditioning images as uint8 (input alone).")
    flags.DEFINE_integer("num_examples", None, "The first N examples of the split (default all).")
    flags.DEFINE_integer("seed", 0, "Seed of the observation noise (noise_std > 0).")


def main(argv) -> None:
    del argv
    cli.quiet_libraries()
    f = flags.FLAGS
    with cli.user_errors():
        cli.require_flags("output", "reference")
        if (f.workdir is None) == (f.config is None):
            raise cli.UserError("give exactly one of --workdir and --config")
        if f.workdir is not None:
            config = load_workdir_config(f.workdir)
        else:
            try:
                config = load_config_file(f.config)
            except (OSError, ValueError) as e:
                raise cli.UserError(f"--config={f.config}: {e}") from None
        record = run(
            f.output,
            f.reference,
            config=config,
            split=f.split,
            num_examples=f.num_examples,
            seed=f.seed,
            baseline=f.baseline,
        )
    print(json.dumps(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
