"""Fewer steps (study 5, Song et al. 2021): FD, diversity and time of DDPM ancestral sampling,
DDIM at eta in {0, 0.5, 1} and DPM-Solver++(2M) (one model evaluation a step, like the others)
over 10, 20, 50 and 100 steps, and DDPM and DDIM (eta 0) at 1,000, of one checkpoint
(configs/ddpm_digits.py trained as the README does); the reconstruction error of DDIM
inversion (x_0 -> x_T -> x_0, eta = 0) of test digits; and a strip of images decoded from the
spherical interpolation between two x_T. The paper: DDIM is far better than DDPM at few steps,
the two meet at 1,000, and the deterministic DDIM encodes and decodes almost exactly.

`python experiments/ddim.py [--quick]` writes experiments/results/ddim.csv, .md, .png and
ddim_interpolation.png.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from study_common import SAMPLES_DIR, DigitsScores, Study, line_figure, sample_images

from diffusion_jax import data, grid, samplers
from diffusion_jax.data import to_model_range, to_uint8
from diffusion_jax.workdir import load_workdir

# (sampler, eta); DPM-Solver++(2M) adds the quality per model evaluation of a multistep solver.
# DDPM ignores eta (its variance is var_type's): 0, the config's, as the variance study samples
# it, so that the two studies share its chains (sample_images' cache).
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("dpm_solver++2m", 0.0)]
NAMES = {"ddpm": "DDPM", "dpm_solver++2m": "DPM-Solver++(2M)"}


def chain_fns(wd, num_steps: int):
    """DDIM (eta = 0) encode and decode over num_steps steps, unclipped."""
    d = wd.config.diffusion

    def denoise(x, t):
        return wd.model.apply({"params": wd.params}, x, t, train=False)

    options = dict(parameterization=d.parameterization, var_type=d.var_type)
    padded = samplers.prepare_schedule(wd.schedule, num_steps, "ddim")

    def encode(x0):
        return samplers.ddim_invert(denoise, wd.schedule, x0, num_steps=num_steps, **options)

    def decode(x_T):
        out = samplers.run_chain(
            denoise,
            padded,
            num_steps,
            x_T,
            jax.random.key(0),
            sampler="ddim",
            clip_denoised=False,
            **options,
        )
        return out["sample"]

    return encode, jax.jit(decode)  # ddim_invert respaces its schedule in numpy: not jitted


def slerp(a, b, w):
    theta = jnp.arccos(jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    return (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / jnp.sin(theta)


def main():
    study = Study("ddim", __doc__)
    workdir = study.default_workdir()
    wd = load_workdir(workdir)
    scores = DigitsScores(wd.config)
    n = 100 if study.quick else 1000
    steps_list = [10] if study.quick else [10, 20, 50, 100, 1000]
    rows = []
    for steps in steps_list:
        for sampler, eta in SAMPLERS:
            if steps > 100 and (sampler == "dpm_solver++2m" or eta > 0):
                # each would be one more 1,000-step chain of n samples for little news: the
                # few-step solver, and DDIM with noise (eta 1 at 1,000 steps is DDPM with
                # beta-tilde, the variance study's chain)
                continue
            images, seconds = sample_images(
                wd, n, sampler=sampler, steps=steps, eta=eta, cache_dir=workdir / SAMPLES_DIR
            )
            name = NAMES.get(sampler, f"DDIM eta={eta}")
            rows.append(
                scores.row(images, sampler=name, steps=steps, samples=n, seconds=round(seconds, 1))
            )
            study.log(str(rows[-1]))

    test = data.create_source(wd.config.data, split="test")
    x0 = to_model_range(np.stack([test[i]["image"] for i in range(min(len(test), n))]))
    inversion = []
    for steps in (10,) if study.quick else (10, 50, 100):
        encode, decode = chain_fns(wd, steps)
        start = time.time()
        x_rec = np.asarray(decode(encode(x0)))
        err = np.mean((to_uint8(x_rec).astype(float) - to_uint8(x0).astype(float)) ** 2)
        psnr = 10 * np.log10(255.0**2 / err)
        inversion.append(f"{steps} steps: PSNR {psnr:.2f} dB ({time.time() - start:.1f} s)")
        study.log(f"inversion {inversion[-1]}")

    _, decode = chain_fns(wd, 50)
    keys = jax.random.split(jax.random.key(1), 4)
    ends = [jax.random.normal(k, x0.shape[1:]) for k in keys]
    weights = np.linspace(0, 1, 9)
    strip = jnp.stack([slerp(a, b, w) for a, b in (ends[:2], ends[2:]) for w in weights])
    grid.save_grid(to_uint8(decode(strip)), study.out / "ddim_interpolation.png", ncols=9)

    notes = (
        f"DDIM inversion of {len(x0)} test digits and decoding (eta = 0), PSNR of the "
        f"reconstruction: {'; '.join(inversion)}. Interpolation (DDIM 50 steps, slerp of x_T): "
        "ddim_interpolation.png."
    )
    figure = line_figure(rows, "steps", "sampler", {"FD": "FD", "diversity": "diversity"})
    study.write(rows, figure, notes=notes)


if __name__ == "__main__":
    main()
