"""One step is blurry (study 4, DDPM paper Sec. 4.3 and Fig. 6): along a DDPM chain of one
checkpoint (configs/ddpm_digits.py trained as the README does), the model's one-step
prediction x0_hat(x_t) at large t is a blurry average of the digits x_t may become, and only the
full chain makes sharp samples. Measured at t = 900, 700, 500, 300, 100 and 0 against the
chain's samples: FD, class IS and sharpness (mean absolute Laplacian over the training digits').

`python experiments/one_step.py [--quick]` writes experiments/results/one_step.csv, .md, .png
(the metrics against t) and one_step_strip.png (rows: samples; columns: x0_hat at t = 900 ...
0, then the chain's sample).
"""

import jax
import numpy as np
from study_common import DigitsScores, Study, line_figure

from diffusion_jax import data, grid, samplers
from diffusion_jax.data import to_uint8
from diffusion_jax.workdir import load_workdir


def sharpness(images: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of uint8 images (pixels in [0, 1])."""
    x = images[..., 0].astype(np.float64) / 255.0
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def main():
    study = Study("one_step", __doc__)
    wd = load_workdir(study.default_workdir())
    scores = DigitsScores(wd.config)
    d, c = wd.config.diffusion, wd.config.data
    n = 100 if study.quick else 1000
    every = d.num_timesteps // 10  # frame j: x0_hat(x_t) at t = T - (j + 1) every

    def denoise(x, t):
        return wd.model.apply({"params": wd.params}, x, t, train=False)

    def chain(key):
        shape = (n, c.image_size, c.image_size, c.num_channels)
        return samplers.ddpm_sample(
            denoise,
            wd.schedule,
            shape,
            key,
            intermediates_every=every,
            parameterization=d.parameterization,
            var_type=d.var_type,
            progress_fn=samplers.tqdm_progress("denoising"),
        )

    out = jax.jit(chain)(jax.random.key(0))
    # t = 900, 700, 500, 300, 100 of T = 1000; at t = 0 x0_hat is the chain's sample itself.
    frames = [(j, d.num_timesteps - (j + 1) * every) for j in range(0, 10, 2)]
    train = data.create_source(c, split="train")
    real = np.stack([train[i]["image"] for i in range(len(train))])
    sets = [(f"x0_hat(x_t), t={t}", t, to_uint8(out["pred_x0"][j])) for j, t in frames]
    sets.append(("chain sample", 0, to_uint8(out["sample"])))
    rows = [
        dict(
            what=what,
            t=t,
            FD=scores.fd(images),
            IS=scores.inception_score(images),
            sharpness=sharpness(images),
        )
        for what, t, images in sets
    ]
    rows.append(
        dict(what="training digits", IS=scores.inception_score(real), sharpness=sharpness(real))
    )
    for r in rows:
        study.log(str(r))

    strip = np.stack([images[:8] for _, _, images in sets], axis=1)  # (8, columns, H, W, C)
    path = study.out / "one_step_strip.png"
    grid.save_grid(strip.reshape(-1, *strip.shape[2:]), path, ncols=len(sets))
    curve = [dict(r, series="x0_hat, then the sample at t=0") for r in rows[:-1]]
    figure = line_figure(curve, "t", "series", {"FD": "FD", "sharpness": "sharpness"}, logx=False)
    study.write(rows, figure)


if __name__ == "__main__":
    main()
