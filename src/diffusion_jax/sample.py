"""Sample a trained workdir: `python -m diffusion_jax.sample --workdir=W --num_samples=N
--output=F.npz [--sampler=NAME --steps=K --eta=E --seed=S --batch_size=B --labels=L
--guidance=W]`.

A class-conditional workdir (model.num_classes = K > 0) samples classes `--labels=3` (every
sample), `--labels=0,1,2` (cycled over the samples) or, without the flag, 0..K-1 cycled, under
classifier-free guidance of weight `--guidance` (default config.sampling.guidance); F.npz then
also holds `labels` int32 (N,), and F.png shows a row per class when every class has as many
samples.

An image-conditioned workdir (config.conditioning.degradation, e.g. SR3's "sr" or "blur")
samples `--condition=OBS.npz`: its `images` uint8 (N, h, w, C) are observations of any origin
(for "sr" the low-res images, h = H / sr_factor; for "blur" the blurred ones); the network sees
each as degradations.DEGRADATIONS[name].condition makes it. --num_samples defaults to N and may
be k * N: k samples per observation, sample i * k + j being the j-th of observation i; F.npz
also holds `reference_index` int32 (the observation of each sample, read by evaluate's psnr and
ssim). A regression workdir (training.objective "regression") answers the same command with its
deterministic predictions, and so does a predict-and-refine workdir's predictor with
`--predictor_only`.

`--schedule=train` (the training schedule) or `--schedule=NAME:T[:BETA_START:BETA_END]` runs
the chain on another schedule than config.sampling.schedule: a model conditioned on the
continuous level sqrt(alpha_bar) (SR3) samples on any schedule within its trained levels.

Uses the EMA parameters of the newest readable checkpoint; NAME is a key of samplers.SAMPLERS;
sampler, steps, eta and batch size default to the workdir's config.sampling. Writes F.npz
(`images`: uint8 (N, H, W, C), and `provenance`: a JSON string saying how they were made, see
`provenance`; no pickle) and a PNG grid of the first 100 images beside it (F.png), and prints
one JSON line holding the same provenance. The images are a function of (checkpoint, sampler,
steps, eta, seed): the batch size and the device count do not change them. Bad input, including
an output path that cannot be written (checked before sampling), is reported as one `error:`
line with exit code 2.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_dict

from diffusion_jax import (
    __version__,
    cli,
    degradations,
    generate,
    grid,
    hostmem,
    parallel,
    schedules,
)
from diffusion_jax.metrics.cache import save_tree
from diffusion_jax.samplers import SAMPLERS
from diffusion_jax.validation import ConfigError, validate_config
from diffusion_jax.workdir import (
    Workdir,
    check_classifier,
    load_classifier,
    load_config,
    load_workdir,
)

GRID_IMAGES = 100
REFERENCE_INDEX = "reference_index"  # in a samples file: the observation of each sample


def sampler_options(
    config, *, sampler=None, steps=None, eta=None, batch_size=None, guidance=None
) -> dict:
    """The options make_sampler takes: the given ones, else config.sampling's; checked.
    guidance is an option of class-conditional models only."""
    sc = config.sampling
    field, num_timesteps = "diffusion.num_timesteps", config.diffusion.num_timesteps
    if (own := schedules.sampling_schedule_args(config)) is not None:  # the chain's schedule
        field, num_timesteps = "sampling.schedule.num_timesteps", own[1]
    sampler = sc.sampler if sampler is None else sampler
    steps = sc.steps if steps is None else steps
    eta = sc.eta if eta is None else eta
    batch_size = sc.batch_size if batch_size is None else batch_size
    if sampler not in SAMPLERS:
        raise cli.UserError(f"--sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= num_timesteps:
        raise cli.UserError(
            f"--steps={steps}: expected 1 to {num_timesteps} (the workdir's {field})"
        )
    if not 0.0 <= eta <= 1.0:
        raise cli.UserError(f"--eta={eta}: expected a number in [0, 1]")
    if batch_size < 1:
        raise cli.UserError(f"--batch_size={batch_size}: expected a positive integer")
    options = dict(sampler=sampler, steps=steps, eta=float(eta), batch_size=batch_size)
    if not generate.num_classes(config):
        if guidance is not None:
            raise cli.UserError(
                f"--guidance={guidance}: this workdir's model is unconditional "
                "(model.num_classes=0); classifier-free guidance needs a class-conditional one"
            )
        return options
    guidance = sc.get("guidance", 0.0) if guidance is None else guidance
    if not guidance >= 0.0:
        raise cli.UserError(f"--guidance={guidance}: expected a number >= 0 (0: no guidance)")
    return dict(options, guidance=float(guidance))


def parse_labels(
    text: str | None, config, num_samples: int, classifier_config=None
) -> np.ndarray | None:
    """The per-sample labels of `--labels`: "3" (all), "0,1,2" (cycled over the samples), None
    (0..K-1 cycled); None for an unguided unconditional model, which must not be given labels.
    K is the model's classes, or the guiding classifier's (generate.num_classes)."""
    k = generate.num_classes(config, classifier_config)
    if text is None:
        return generate.cycled_labels(config, num_samples, classifier_config)
    if not k:
        raise cli.UserError(
            f"--labels={text}: this workdir's model is unconditional (model.num_classes=0) "
            "and no --classifier_workdir guides it"
        )
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise cli.UserError(
            f"--labels={text}: expected a class or comma-separated classes in 0..{k - 1}"
        ) from None
    bad = [v for v in values if not 0 <= v < k]
    if bad:
        raise cli.UserError(
            f"--labels={text}: label {bad[0]} is outside this model's classes 0..{k - 1}"
        )
    return np.resize(np.asarray(values, np.int32), num_samples)


def sample_workdir(
    wd: Workdir,
    num_samples: int,
    options: dict,
    *,
    seed: int = 0,
    mesh=None,
    labels=None,
    classifier=None,
    conditions=None,
    predictor_only=False,
):
    """uint8 images (num_samples, H, W, C) from the workdir's EMA params, sharded over `mesh`;
    labels: one class per sample of a class-conditional or classifier-guided model (None:
    cycled); classifier: workdir.load_classifier's (apply_fn, params, config); conditions: one
    conditioning image per sample of an image-conditioned model (`load_condition`);
    predictor_only: a refiner's predictor alone (generate.make_predictor)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    sample = generate.make_sampler(
        wd.model,
        wd.schedule,
        wd.config,
        mesh,
        progress=True,
        classifier=classifier,
        predictor_only=predictor_only,
    )
    key = jax.random.key(seed)
    return sample(wd.params, key, num_samples, labels=labels, conditions=conditions, **options)


def check_output(output: Path) -> None:
    """Raise UserError unless `output` can be written: its directory exists (or is made here)
    and takes a new file. Run before sampling, so a bad path costs no sampling time."""
    if output.suffix != ".npz":
        raise cli.UserError(f"--output={output}: expected a file name ending in .npz")
    if output.is_dir():
        raise cli.UserError(f"--output={output}: is a directory; expected a .npz file name")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}."):
            pass
    except OSError as e:
        raise cli.UserError(
            f"--output={output}: cannot write there ({e.strerror or e}); choose another path"
        ) from None


def provenance(workdir, step: int, num_samples: int, seed: int, options: dict) -> dict:
    """How a set of samples was made: everything that determines the images, and who made them."""
    return dict(
        workdir=str(Path(workdir).resolve()),
        step=step,
        params="ema",
        num_samples=num_samples,
        seed=seed,
        **options,
        diffusion_jax_version=__version__,
    )


def read_provenance(npz) -> dict | None:
    """The provenance stored in an open samples .npz, or None for files written without it."""
    if "provenance" not in npz.files:
        return None
    return json.loads(str(npz["provenance"]))


def load_condition(path, config, num_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(conditioning images float32 (num_samples, H, W, C), reference_index int32) of the
    observations in `--condition=path`, each repeated num_samples / N times in a row; UserError
    for a workdir without image conditioning, a file of the wrong shape or dtype, or a count
    that is not a multiple of N."""
    name = degradations.configured(config)
    flag = f"--condition={path}"
    if not name:
        raise cli.UserError(f"{flag}: this workdir's model is not conditioned on images")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise cli.UserError(f"{flag}: no array 'images' in the file ({npz.files})")
            images = npz["images"]
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{flag}: cannot read it as an .npz ({e})") from None
    c = config.data.num_channels
    h = degradations.DEGRADATIONS[name].observed_size(config.data.image_size, config.conditioning)
    if images.dtype != np.uint8:
        raise cli.UserError(f"{flag}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (h, h, c) or not len(images):
        raise cli.UserError(
            f"{flag}: images must have shape (N, {h}, {h}, {c}) for this workdir's "
            f"{name!r} conditioning, got {images.shape}"
        )
    n = len(images)
    num_samples = n if num_samples is None else num_samples
    if num_samples % n:
        raise cli.UserError(
            f"--num_samples={num_samples}: expected a multiple of the {n} observations in {path}"
        )
    index = np.repeat(np.arange(n, dtype=np.int32), num_samples // n)
    return generate.condition_images(config, images)[index], index


def with_schedule(config, text: str | None):
    """config with `--schedule=text` as its sampling.schedule: "train" (the training schedule) or
    "NAME:T" / "NAME:T:BETA_START:BETA_END" (a schedules.SCHEDULES name); the steps follow
    (all T of it unless --steps says fewer). Checked like a config (a timestep-conditioned
    model takes only "train"; the levels must lie in the trained range). None: unchanged."""
    if text is None:
        return config
    config = config_dict.ConfigDict(config.to_dict())
    spec = config.sampling.schedule
    if text == "train":
        spec.update(name="", num_timesteps=0, beta_start=None, beta_end=None)
        config.sampling.steps = config.diffusion.num_timesteps
    else:
        parts = text.split(":")
        try:
            if len(parts) not in (2, 4):
                raise ValueError
            betas = [float(b) for b in parts[2:]] or [None, None]
            spec.update(name=parts[0], num_timesteps=int(parts[1]))
            spec.beta_start, spec.beta_end = betas
        except ValueError:
            raise cli.UserError(
                f"--schedule={text}: expected 'train', NAME:T or NAME:T:BETA_START:BETA_END"
            ) from None
        config.sampling.steps = spec.num_timesteps
    try:
        validate_config(config)
    except ConfigError as e:
        raise cli.UserError(f"--schedule={text}: {e}") from None
    return config


def run(
    workdir,
    num_samples: int | None,
    output,
    *,
    seed: int = 0,
    labels=None,
    classifier_workdir=None,
    classifier_scale=None,
    condition=None,
    schedule=None,
    predictor_only=False,
    **options,
) -> dict:
    """Sample `workdir` into the .npz `output` and a grid beside it; returns the JSON record.
    labels: the `--labels` text (None: classes cycled, for a class-conditional or
    classifier-guided model); classifier_workdir: a noisy classifier's workdir that guides the
    chain at classifier_scale (default 1); condition: the `--condition` .npz of observations
    (image-conditioned and regression workdirs; num_samples None: one sample each); schedule:
    the `--schedule` text (`with_schedule`); predictor_only: `--predictor_only`, a refiner's
    predictor g(y) alone."""
    start = time.time()
    if num_samples is not None and num_samples < 1:
        raise cli.UserError(f"--num_samples={num_samples}: expected a positive integer")
    if classifier_scale is not None and classifier_workdir is None:
        raise cli.UserError(
            f"--classifier_scale={classifier_scale}: give the classifier's --classifier_workdir"
        )
    output = Path(output)
    config = with_schedule(load_config(workdir), schedule)
    conditions = reference_index = None
    if condition is not None:
        conditions, reference_index = load_condition(condition, config, num_samples)
        num_samples = len(conditions)
    elif degradations.configured(config):
        raise cli.UserError(
            f"workdir {workdir} is conditioned on images (conditioning.degradation="
            f"{degradations.configured(config)!r}): give --condition=OBS.npz"
        )
    elif num_samples is None:
        raise cli.UserError("--num_samples is required (without --condition)")
    if predictor_only and config.model.get("name") != "refiner":
        raise cli.UserError(
            "--predictor_only: this workdir's model is not a predict-and-refine refiner"
        )
    options = sampler_options(config, **options)
    classifier_config = None
    if classifier_workdir is not None:
        classifier_config = check_classifier(classifier_workdir, config)
        options["classifier_scale"] = 1.0 if classifier_scale is None else float(classifier_scale)
    label_array = parse_labels(labels, config, num_samples, classifier_config)
    if jax.process_index() == 0:
        check_output(output)
    mesh = parallel.make_mesh()
    wd = load_workdir(workdir, config=config, mesh=mesh)
    classifier = None
    if classifier_workdir is not None:
        classifier = load_classifier(classifier_workdir, config, mesh=mesh)
    images = sample_workdir(
        wd,
        num_samples,
        options,
        seed=seed,
        mesh=mesh,
        labels=label_array,
        classifier=classifier,
        conditions=conditions,
        predictor_only=predictor_only,
    )
    made = provenance(workdir, wd.step, num_samples, seed, options)
    if schedule is not None:
        made["schedule"] = schedule
    if predictor_only:
        made["predictor_only"] = True
    if classifier_workdir is not None:
        made["classifier_workdir"] = str(Path(classifier_workdir).resolve())
    if labels is not None:
        made["labels"] = labels
    if condition is not None:
        made["condition"] = str(Path(condition).resolve())
    record = dict(output=str(output), grid=None, **made)
    if jax.process_index() == 0:
        # A JSON string as a numpy unicode array: readable with allow_pickle=False.
        arrays = {"images": images, "provenance": np.array(json.dumps(made))}
        if label_array is not None:
            arrays["labels"] = label_array
        if reference_index is not None:
            arrays[REFERENCE_INDEX] = reference_index
        save_tree(output, arrays)
        shown = slice(0, GRID_IMAGES)
        path = output.with_suffix(".png")
        if label_array is None:
            record["grid"] = str(grid.save_grid(images[shown], path))
        else:
            record["grid"] = str(grid.save_class_grid(images[shown], label_array[shown], path))
    return dict(record, seconds=round(time.time() - start, 3))


def define_sampler_flags() -> None:
    """Flags shared with the evaluate CLI, which samples when it is given no samples file."""
    flags.DEFINE_string(
        "sampler", None, f"One of {', '.join(SAMPLERS)} (default: config.sampling.sampler)."
    )
    flags.DEFINE_integer(
        "steps", None, "Denoising steps, 1 to T, evenly spaced (default: config.sampling.steps)."
    )
    flags.DEFINE_float(
        "eta", None, "DDIM noise in [0, 1], 0 = deterministic; used by ddim only (default: config)."
    )
    flags.DEFINE_integer(
        "seed", 0, "Random seed: sample i of a seed is the same at any batch size and device count."
    )
    flags.DEFINE_float(
        "guidance",
        None,
        "Classifier-free guidance weight w >= 0 of a class-conditional model (default: "
        "config.sampling.guidance).",
    )


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A workdir written by diffusion_jax.train.")
    flags.DEFINE_integer(
        "num_samples",
        None,
        "How many images to sample (with --condition: a multiple of its N images, default N).",
    )
    flags.DEFINE_string("output", None, "The .npz to write; the PNG grid goes beside it.")
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Images per batch, rounded up to a multiple of the device count; the images do not "
        "depend on it (default: config.sampling.batch_size).",
    )
    flags.DEFINE_string(
        "labels",
        None,
        "Class-conditional or classifier-guided models: a class (3) or classes cycled over the "
        "samples (0,1,2); default 0..K-1 cycled.",
    )
    flags.DEFINE_string(
        "classifier_workdir",
        None,
        "Classifier guidance: the workdir of a noisy classifier (configs/classifier_digits.py) "
        "trained on the same data and schedule.",
    )
    flags.DEFINE_float(
        "classifier_scale",
        None,
        "Classifier guidance scale s: the chain follows s * grad log p(y | x_t) (default 1).",
    )
    flags.DEFINE_string(
        "condition",
        None,
        "Image-conditioned models: an .npz whose `images` uint8 (N, h, w, C) are the "
        "observations to condition on (SR3's low-res images, blurred images).",
    )
    flags.DEFINE_string(
        "schedule",
        None,
        "The schedule the chain runs on: 'train' or NAME:T[:BETA_START:BETA_END] (default: "
        "config.sampling.schedule); another than the training one needs a model conditioned on "
        "sqrt_alpha_bar.",
    )
    flags.DEFINE_bool(
        "predictor_only",
        False,
        "Predict-and-refine models: write the predictor's output g(y) alone, no diffusion.",
    )
    define_sampler_flags()


def main(argv) -> None:
    del argv
    hostmem.keep_freed_memory()
    cli.use_compilation_cache()
    cli.quiet_libraries()
    f = flags.FLAGS
    with cli.user_errors():
        cli.require_flags("workdir", "output")
        record = run(
            f.workdir,
            f.num_samples,
            f.output,
            seed=f.seed,
            sampler=f.sampler,
            steps=f.steps,
            eta=f.eta,
            batch_size=f.batch_size,
            guidance=f.guidance,
            labels=f.labels,
            classifier_workdir=f.classifier_workdir,
            classifier_scale=f.classifier_scale,
            condition=f.condition,
            schedule=f.schedule,
            predictor_only=f.predictor_only,
        )
    print(json.dumps(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
