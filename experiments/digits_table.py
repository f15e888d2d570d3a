"""The README's digits table: the default checkpoint (configs/ddpm_digits.py as the README trains
it: the sweep experiments/sweeps/default.py) sampled by DDPM ancestral, DDIM (eta 0),
DPM-Solver++(2M) and its SDE form at 5 to 1,000 model
evaluations, 1,000 samples each, scored as a new user would score them (`evaluate
--metric=fd,is,memorization`): FD to all 1,797 real digits in the digits classifier's features
beside the data's floor (the FD between random halves of the real digits), class IS beside the
real digits', and each sample's nearest training digit beside the test digits'; with the
sampling time and the test-split bits/dim.

`python experiments/digits_table.py [--quick]` writes experiments/results/digits_table.csv, .md,
.png (FD against model evaluations) and digits_table_<sampler>.png, a grid of the config's
sampler.
"""

import numpy as np
from study_common import SAMPLES_DIR, Study, line_figure, sample_images

from diffusion_jax import evaluate, grid
from diffusion_jax.workdir import load_workdir

NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "dpm_solver++2m": "DPM-Solver++(2M)",
    "sde_dpm_solver++2m": "SDE-DPM-Solver++(2M)",
}
STEPS = {  # model evaluations per sample (one per step for each of these samplers)
    "ddpm": [10, 20, 50, 100, 1000],
    "ddim": [10, 20, 50, 100],
    "dpm_solver++2m": [5, 10, 20, 50],
    "sde_dpm_solver++2m": [10, 20, 50],
}
QUICK_STEPS = {"ddpm": [10], "ddim": [10], "dpm_solver++2m": [5, 10], "sde_dpm_solver++2m": [10]}


def fd_figure(rows):
    """FD / floor (equal-size comparisons) against model evaluations, a line per sampler, and
    the floor's level, 1."""
    figure = line_figure(
        [dict(r, sampler=r["sampler"].removesuffix(" (default)")) for r in rows],
        "model evaluations",
        "sampler",
        {"FD / floor": "FD / floor (matched, equal sizes)"},
    )
    figure.axes[0].axhline(1.0, color="grey", ls="--", label="floor: real halves")
    figure.axes[0].set_yscale("log")
    figure.axes[0].legend(fontsize=7)
    return figure


def main():
    study = Study("digits_table", __doc__)
    workdir = study.default_workdir("default")
    wd = load_workdir(workdir)
    n = 100 if study.quick else 1000
    default = (wd.config.sampling.sampler, wd.config.sampling.steps)
    rows, yardstick = [], {}
    for sampler, steps_list in (QUICK_STEPS if study.quick else STEPS).items():
        for steps in steps_list:
            images, seconds = sample_images(
                wd, n, sampler=sampler, steps=steps, cache_dir=workdir / SAMPLES_DIR
            )
            path = study.root / f"{sampler}{steps}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, images=images)
            fd, is_, nn = evaluate.evaluate_sample_metrics(
                workdir, ["fd", "is", "memorization"], samples=path
            )
            yardstick = dict(floor=fd["floor"], data_is=is_["data_is"], held_out=nn["held_out"])
            rows.append(
                {
                    "sampler": NAMES[sampler]
                    + (" (default)" if (sampler, steps) == default else ""),
                    "model evaluations": steps,
                    "FD": fd["value"],
                    "FD / floor": fd["ratio_to_floor"],
                    "IS": is_["value"],
                    "IS / data": is_["ratio_to_data"],
                    "NN / test": nn["ratio_to_held_out"],
                    "sample s": round(seconds, 1),
                }
            )
            study.log(str(rows[-1]))
            if (sampler, steps) == default:
                grid.save_grid(images[:100], study.out / f"digits_table_{sampler}.png", ncols=10)

    nll = evaluate.evaluate_nll(workdir, split="test", num_samples=100 if study.quick else None)
    figure = fd_figure(rows)
    notes = (
        f"{n} samples per row, seed 0, of `{workdir}` at step {wd.step}. The data's own scores: "
        f"FD floor {yardstick['floor']:.3f} (two random halves of the 1,797 real digits, mean of "
        f"{evaluate.FLOOR_PARTITIONS} halvings); class IS of the real digits "
        f"{yardstick['data_is']:.3f}; mean distance of a test digit to its nearest training "
        f"digit {yardstick['held_out']:.4f} (NN / test below 1 would mean samples closer to the "
        f"training digits than unseen digits are). Test-split bound: {nll['total_bpd']:.3f} "
        f"bits/dim ({nll['num_examples']} digits)."
    )
    study.write(rows, figure, notes=notes)


if __name__ == "__main__":
    main()
