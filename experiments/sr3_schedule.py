"""SR3's schedule change (study 7, Saharia et al. 2021, Sec. 2.4): a model conditioned on the
continuous noise level sqrt(alpha_bar) (configs/sr3_photos.py:short, trained 1,000 steps on T =
2000, betas 1e-4..2e-2) samples with its training schedule, the same schedule respaced, and
shorter schedules of their own (T = 100 and 50, betas to 0.1 and 0.2, so alpha_bar_T stays near
0); the same network and training conditioned on the integer timestep (`:timestep`) can only be
respaced. The claim: the noise-level model keeps its quality on the short schedules, at a
twentieth of the steps. PSNR and SSIM of one DDPM ancestral sample per held-out patch (every
sixth of the test strip: 12) against the truth, with bicubic beside them, and the sample CLI's
seconds (compilation included).

`python experiments/sr3_schedule.py [--quick]` writes experiments/results/sr3_schedule.csv,
.md, .png (PSNR and SSIM against the steps) and sr3_schedule_patches.png (rows of patches:
low-res, bicubic, each setting, the truth).
"""

import numpy as np
from restoration import picture
from study_common import Study, line_figure

from diffusion_jax import degrade, sample
from diffusion_jax.evaluate import evaluate_image_quality
from diffusion_jax.workdir import load_config

EVERY = 6  # every sixth patch of the test strip: 12, with two 2,000-step chains


def settings(num_timesteps: int) -> list[tuple[str, str, str | None, int | None]]:
    """(conditioning, schedule, the sample CLI's --schedule, --steps) of each row; schedule
    "training" is the training schedule, respaced to the row's steps."""
    steps = [num_timesteps, num_timesteps // 20, num_timesteps // 40]  # 2000, 100, 50
    rows = [("noise level", "training", "train", k) for k in steps]
    rows += [
        ("noise level", "linear, beta 1e-4..0.1 (SR3's)", "linear:100:0.0001:0.1", None),
        ("noise level", "linear, beta 1e-4..0.2", "linear:50:0.0001:0.2", None),
    ]
    rows += [("timestep", "training", None, k) for k in steps]
    return rows


def scores(path, reference) -> dict:
    return {
        metric.upper(): evaluate_image_quality(metric, samples=path, reference=reference)["value"]
        for metric in ("psnr", "ssim")
    }


def main():
    study = Study("sr3_schedule", __doc__)
    workdirs = {
        "noise level": study.default_workdir("sr3"),
        "timestep": study.default_workdir("sr3_timestep"),
    }
    study.root.mkdir(parents=True, exist_ok=True)
    config = load_config(workdirs["noise level"])
    lr, hr, bicubic = (study.root / f"{name}.npz" for name in ("lr_all", "hr_all", "bicubic_all"))
    degrade.run(lr, hr, config=config, num_examples=12 if study.quick else None, baseline=bicubic)
    few = {}
    for name, path in (("lr", lr), ("hr", hr), ("bicubic", bicubic)):
        few[name] = study.root / f"{name}.npz"
        with np.load(path) as f:
            np.savez(few[name], images=f["images"][::EVERY])
    rows = [dict(conditioning="bicubic", schedule="", steps=0, **scores(few["bicubic"], few["hr"]))]
    columns = [few["lr"], few["bicubic"]]
    for i, (conditioning, label, schedule, steps) in enumerate(
        settings(config.diffusion.num_timesteps)
    ):
        path = study.root / f"setting_{i}.npz"
        record = sample.run(
            workdirs[conditioning],
            None,
            path,
            condition=few["lr"],
            schedule=schedule,
            **({} if steps is None else {"steps": steps}),
        )
        row = dict(conditioning=conditioning, schedule=label, steps=record["steps"])
        rows.append(dict(row, **scores(path, few["hr"]), seconds=record["seconds"]))
        columns.append(path)
        study.log(str(rows[-1]))
    shown = list(range(min(8, len(np.load(few["hr"])["images"]))))
    picture([(f, shown) for f in [*columns, few["hr"]]], study.out / "sr3_schedule_patches.png")
    chains = [  # one line per conditioning and kind of schedule
        dict(
            r, chain=f"{r['conditioning']}, {'respaced' if r['schedule'] == 'training' else 'own'}"
        )
        for r in rows[1:]
    ]
    figure = line_figure(chains, "steps", "chain", {"PSNR": "PSNR (dB)", "SSIM": "SSIM"})
    study.write(rows, figure, notes="Patches: sr3_schedule_patches.png.")


if __name__ == "__main__":
    main()
