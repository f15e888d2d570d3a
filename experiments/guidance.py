"""The guidance trade-off (study 8): class accuracy (fidelity) against FD (diversity) of
classifier-free guidance of the class-conditional digits model (configs/cfg_digits.py) over the
weight w, and of classifier guidance of the unconditional one (configs/ddpm_digits.py guided
by configs/classifier_digits.py) over the scale s (Ho & Salimans 2022, Dhariwal & Nichol 2021:
guidance raises fidelity and lowers diversity as it grows). 1,000 samples per setting, classes
cycled 0..9, the config's sampler (DDIM, 50 steps).

`python experiments/guidance.py [--quick]` writes experiments/results/guidance.csv, .md, .png.
"""

from study_common import Study, line_figure

from diffusion_jax import evaluate, sample

WEIGHTS = [0.0, 1.0, 3.0, 5.0]


def scores(workdir, samples) -> dict:
    accuracy = evaluate.evaluate_class_accuracy(workdir, samples=samples)["value"]
    return dict(
        accuracy=accuracy, FD=evaluate.evaluate_samples(workdir, "fid", samples=samples)["value"]
    )


def main():
    study = Study("guidance", __doc__)
    n = 100 if study.quick else 1000
    cfg_root = study.shared_root("cfg_digits")
    classifier_root = study.shared_root("classifier_digits")
    study.sweep("cfg_digits", cfg_root)
    study.sweep("classifier_digits", classifier_root)
    unconditional = study.default_workdir()
    study.root.mkdir(parents=True, exist_ok=True)
    weights = [0.0, 3.0] if study.quick else WEIGHTS  # --quick: off, and one weight
    settings = [("classifier-free w", w, cfg_root / "base", {"guidance": w}) for w in weights]
    guide = {"classifier_workdir": classifier_root / "base"}
    settings += [
        ("classifier s", s, unconditional, dict(guide, classifier_scale=s)) for s in weights
    ]
    rows = []
    for kind, strength, workdir, flags in settings:
        path = study.root / f"{kind.split()[0]}_{strength}.npz"
        record = sample.run(workdir, n, path, **flags)
        rows.append(
            dict(
                guidance=kind, strength=strength, **scores(workdir, path), seconds=record["seconds"]
            )
        )
        study.log(str(rows[-1]))
    figure = line_figure(
        rows, "strength", "guidance", {"accuracy": "class accuracy", "FD": "FD"}, logx=False
    )
    study.write(rows, figure)


if __name__ == "__main__":
    main()
