"""Which reverse variance (study 3): sigma_t^2 = beta_t ("fixed_large") against the posterior's
beta-tilde_t ("fixed_small") for DDPM ancestral sampling of one checkpoint (configs/ddpm_digits.py
trained as the README does), at all 1,000 steps and respaced to 50 and 10. The DDPM paper
(Sec. 3.2) reports that the two "had similar results"; improved DDPM finds them close at 1,000
steps and apart when respaced to few steps.

`python experiments/variance.py [--quick]` writes experiments/results/variance.csv, .md, .png.
"""

from study_common import SAMPLES_DIR, DigitsScores, Study, line_figure, sample_images

from diffusion_jax.workdir import load_workdir


def main():
    study = Study("variance", __doc__)
    workdir = study.default_workdir()
    wd = load_workdir(workdir)
    scores = DigitsScores(wd.config)
    n = 100 if study.quick else 1000
    steps = [100, 10] if study.quick else [1000, 50, 10]
    rows = []
    for steps_ in steps:
        for var_type in ("fixed_large", "fixed_small"):
            images, seconds = sample_images(
                wd,
                n,
                sampler="ddpm",
                steps=steps_,
                var_type=var_type,
                cache_dir=workdir / SAMPLES_DIR,
            )
            fields = dict(steps=steps_, variance=var_type, samples=n, seconds=round(seconds, 1))
            rows.append(scores.row(images, **fields))
            study.log(str(rows[-1]))
    study.write(rows, line_figure(rows, "steps", "variance", {"FD": "FD", "IS": "class IS"}))


if __name__ == "__main__":
    main()
