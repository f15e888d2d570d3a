"""Perception-distortion in deblurring (study 9; Blau & Michaeli 2018, Whang et al. 2022): the
predict-and-refine model of configs/deblur_photos.py restores the 72 held-out photo patches
blurred by a Gaussian of std 1.5 pixels. The predictor g(y) alone is a regression, the
minimum-distortion end; single refined samples x = g(y) + a sampled residual sit at the
perceptual end, and the mean of k samples of one input moves from there towards g(y) as k
grows. Distortion: PSNR (dB) and SSIM against the sharp patch; perception: the perceptual
distance (`evaluate --metric=perceptual`: LPIPS's form in the FID InceptionV3's features, lower
is closer). All from the evaluate CLI's own functions, 8 samples per patch (DDPM, 100 steps).

`python experiments/perception_distortion.py [--quick]` writes
experiments/results/perception_distortion.csv, .md, .png (the perception-distortion plane) and
perception_distortion_patches.png (columns: blurred, g(y), two refined samples, sharp).
"""

import numpy as np
from restoration import picture
from study_common import Study

from diffusion_jax import degrade, sample
from diffusion_jax.evaluate import evaluate_image_quality
from diffusion_jax.sample import REFERENCE_INDEX
from diffusion_jax.workdir import load_config

METRICS = {"psnr": "PSNR", "ssim": "SSIM", "perceptual": "perceptual"}


def scores(path, reference, mean: bool = False) -> dict:
    """{PSNR, SSIM, perceptual} of the images in `path` (mean: of the mean of each patch's)."""
    out = {}
    for metric, column in METRICS.items():
        record = evaluate_image_quality(metric, samples=path, reference=reference)
        out[column] = record["mean_of_k"]["value"] if mean else record["value"]
    return out


def first_k(path, k: int, out):
    """The first k samples of every patch of a samples file, as a samples file."""
    with np.load(path) as f:
        images, index = f["images"], f[REFERENCE_INDEX]
    keep = np.concatenate([np.flatnonzero(index == i)[:k] for i in np.unique(index)])
    np.savez(out, images=images[keep], **{REFERENCE_INDEX: index[keep]})
    return out


def plane(rows):
    """PSNR against the perceptual distance, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.plot(r["perceptual"], r["PSNR"], "o", color="tab:blue")
        ax.annotate(
            r["method"],
            (r["perceptual"], r["PSNR"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("perceptual distance (lower: closer)")
    ax.set_ylabel("PSNR (dB, higher: less distortion)")
    fig.tight_layout()
    return fig


def main():
    study = Study("perception_distortion", __doc__)
    workdir = study.default_workdir("deblur")
    study.root.mkdir(parents=True, exist_ok=True)
    blurred, sharp = study.root / "blurred.npz", study.root / "sharp.npz"
    num_examples = 8 if study.quick else None
    degrade.run(blurred, sharp, config=load_config(workdir), num_examples=num_examples)
    num_patches = len(np.load(sharp)["images"])
    k_max = 2 if study.quick else 8
    predictor, refined = study.root / "predictor.npz", study.root / "refined.npz"
    rows = [dict(method="blurred input", k="", **scores(blurred, sharp))]
    sample.run(workdir, None, predictor, condition=blurred, predictor_only=True)
    rows.append(dict(method="predictor g(y)", k="", **scores(predictor, sharp)))
    study.log(str(rows[-1]))
    steps = {"steps": 10} if study.quick else {}  # the config's 100 otherwise
    record = sample.run(workdir, num_patches * k_max, refined, condition=blurred, **steps)
    study.log(f"{num_patches} x {k_max} refined samples in {record['seconds']:.0f} s")
    rows.append(dict(method="one refined sample", k=1, **scores(refined, sharp)))
    for k in (2, 4, 8):
        if k <= k_max:
            subset = first_k(refined, k, study.root / f"refined_{k}.npz")
            rows.append(dict(method=f"mean of {k} samples", k=k, **scores(subset, sharp, True)))
            study.log(str(rows[-1]))
    shown = list(range(0, num_patches, max(1, num_patches // 8)))[:8]
    two = first_k(refined, 2, study.root / "refined_2.npz")
    with np.load(two) as f:  # the second sample of each patch, as a file of its own
        second = f["images"][np.flatnonzero(np.arange(len(f["images"])) % 2 == 1)]
    np.savez(study.root / "second.npz", images=second)
    columns = [blurred, predictor, refined, study.root / "second.npz", sharp]
    picture([(f, shown) for f in columns], study.out / "perception_distortion_patches.png")
    study.write(rows, plane(rows), notes="Patches: perception_distortion_patches.png.")


if __name__ == "__main__":
    main()
