"""SR3 super-resolution and predict-and-refine deblurring on the held-out photo patches: the
tables and pictures of docs/results.md.

    python experiments/restoration.py --sr3=W --regression=W --deblur=W [--out=DIR]
        [--samples=8] [--every=3] [--num_examples=N]

The workdirs come from `python -m diffusion_jax.train --config=configs/sr3_photos.py`,
`configs/sr3_photos.py:regression` and `configs/deblur_photos.py`. Every step is a call of a
CLI's own function (degrade.run, sample.run, evaluate.evaluate_image_quality), so each number
can be reproduced with the CLIs. For each method: PSNR and SSIM (dB, [0, 1]) of single samples
and of the mean of the samples drawn for each patch, and the sampling time (seconds, with
compilation; the sample CLI's own count). The 2000-step training schedule costs 20x the
100-step one, so it draws one sample for every --every-th patch only, scored with bicubic on
the same patches beside it. Writes DIR/restoration.csv, DIR/restoration.md and DIR/sr3.png,
DIR/deblur.png (rows of patches; columns as the table's methods, the truth last).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_jax import degrade, sample
from diffusion_jax.evaluate import evaluate_image_quality
from diffusion_jax.workdir import load_config

COLUMNS = (
    "task",
    "method",
    "patches",
    "samples per patch",
    "PSNR",
    "PSNR mean",
    "SSIM",
    "SSIM mean",
    "s",
)


def score(task, method, path, reference, seconds=None) -> dict:
    """The table row of the samples in `path` against `reference`."""
    row = {"task": task, "method": method, "s": "" if seconds is None else f"{seconds:.0f}"}
    for metric in ("psnr", "ssim"):
        record = evaluate_image_quality(metric, samples=path, reference=reference)
        row["samples per patch"] = record["samples_per_reference"]
        row["patches"] = record["num_references"]
        row[metric.upper()] = f"{record['value']:.3f}"
        mean = record["mean_of_k"]
        row[f"{metric.upper()} mean"] = "" if mean is None else f"{mean['value']:.3f}"
    print(" | ".join(str(row.get(c, "")) for c in COLUMNS), flush=True)
    return row


def draw(task, workdir, observations, num, out, **kwargs) -> tuple[Path, float]:
    """Sample `num` images per observation; (the .npz, seconds)."""
    path = out / f"{task}.npz"
    n = len(np.load(observations)["images"])
    record = sample.run(workdir, n * num, path, condition=observations, **kwargs)
    return path, record["seconds"]


def picture(columns: list[tuple[Path, list[int]]], path: Path, scale: int = 2) -> None:
    """A grid with one column per (file, patches): the first image of each listed patch (the
    file's reference_index, else its rows); smaller images, the observations, enlarged by pixel
    repetition; everything `scale`x enlarged."""
    cells = []
    for file, patches in columns:
        with np.load(file) as f:
            images = f["images"]
            index = f["reference_index"] if "reference_index" in f.files else np.arange(len(images))
        images = images[[int(np.flatnonzero(index == p)[0]) for p in patches]]
        factor = 32 // images.shape[1]
        cells.append(images.repeat(factor * scale, 1).repeat(factor * scale, 2))
    gap, size, rows = 2, 32 * scale, len(columns[0][1])
    canvas = np.full((rows * (size + gap), len(cells) * (size + gap), 3), 255, np.uint8)
    for c, column in enumerate(cells):
        for r in range(rows):
            y, x = r * (size + gap), c * (size + gap)
            canvas[y : y + size, x : x + size] = column[r]
    Image.fromarray(canvas).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr3", required=True)
    parser.add_argument("--regression", required=True)
    parser.add_argument("--deblur", required=True)
    parser.add_argument("--out", default="experiments/results/restoration")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--num_examples", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = []

    # SR3: 16x16 -> 32x32.
    lr, hr, bicubic = out / "lr.npz", out / "hr.npz", out / "bicubic.npz"
    degrade.run(
        lr, hr, config=load_config(args.sr3), num_examples=args.num_examples, baseline=bicubic
    )
    rows.append(score("sr", "bicubic", bicubic, hr))
    path, seconds = draw("regression", args.regression, lr, 1, out)
    rows.append(score("sr", "regression UNet", path, hr, seconds))
    fast, seconds = draw("sr3_100", args.sr3, lr, args.samples, out)
    rows.append(score("sr", "SR3, 100-step schedule", fast, hr, seconds))
    few = {name: out / f"{name}_few.npz" for name in ("lr", "hr", "bicubic")}
    for name, path in few.items():
        with np.load(out / f"{name}.npz") as f:
            np.savez(path, images=f["images"][:: args.every])
    lr_few, hr_few, bicubic_few = few["lr"], few["hr"], few["bicubic"]
    rows.append(score("sr", "bicubic", bicubic_few, hr_few))
    trained, seconds = draw("sr3_2000", args.sr3, lr_few, 1, out, schedule="train")
    rows.append(score("sr", "SR3, 2000-step training schedule", trained, hr_few, seconds))
    n = len(np.load(hr)["images"])
    shown = list(range(0, n, max(1, n // 8)))[:8]  # patches spread over the test strip
    few_shown = [p // args.every for p in shown if p % args.every == 0]
    shown = [p * args.every for p in few_shown]
    full = [lr, bicubic, out / "regression.npz", fast]
    picture([(f, shown) for f in full] + [(trained, few_shown), (hr, shown)], out / "sr3.png")

    # Deblurring: the blurred patch, the predictor alone, predict-and-refine.
    blurred, sharp = out / "blurred.npz", out / "sharp.npz"
    degrade.run(blurred, sharp, config=load_config(args.deblur), num_examples=args.num_examples)
    rows.append(score("deblur", "blurred input", blurred, sharp))
    alone, seconds = draw("predictor", args.deblur, blurred, 1, out, predictor_only=True)
    rows.append(score("deblur", "predictor g(y) alone", alone, sharp, seconds))
    refined, seconds = draw("refined", args.deblur, blurred, args.samples, out)
    rows.append(score("deblur", "predict-and-refine", refined, sharp, seconds))
    shown = list(range(0, n, max(1, n // 8)))[:8]
    picture([(f, shown) for f in (blurred, alone, refined, sharp)], out / "deblur.png")

    with open(out / "restoration.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    (out / "restoration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
