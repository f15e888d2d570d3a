"""What the study scripts share: their flags, where results go, the default digits checkpoint,
FD and IS of images in memory, and the table (CSV + Markdown) with the wall time.

A study writes experiments/results/NAME.csv, NAME.md (the table, the command and its wall time)
and NAME.png; with --quick (a smoke run) they go to the study's workdir root instead, so a smoke
run never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_jax import cli, evaluate, hostmem, metrics
from diffusion_jax import sweep as sweep_lib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SWEEPS = REPO / "experiments" / "sweeps"
# In a checkpoint's workdir: the studies' samples of it (sample_images).
SAMPLES_DIR = "study_samples"


def root_name(name: str, quick: bool) -> str:
    """The directory of a study's or a shared sweep's workdirs under the studies' root: NAME, or
    NAME_quick for a smoke run, so that a smoke run never reuses a full run's workdirs."""
    return name + ("_quick" if quick else "")


class Study:
    """A study run: parses --quick / --workdir_root, times itself, writes the results. It
    trains and evaluates its sweeps' points in its own process (`run_sweep(in_process=True)`),
    with the CLIs' compilation cache."""

    def __init__(self, name: str, doc: str):
        parser = argparse.ArgumentParser(description=doc)
        parser.add_argument(
            "--quick", action="store_true", help="a smoke run: tiny models, few samples"
        )
        parser.add_argument(
            "--workdir_root", default=None, help="workdirs (default runs/studies/NAME[_quick])"
        )
        args = parser.parse_args()
        self.name, self.quick = name, args.quick
        default_root = REPO / "runs" / "studies" / root_name(name, self.quick)
        self.root = Path(args.workdir_root or default_root)
        self.out = self.root if self.quick else RESULTS
        self.command = " ".join(["python", *map(shlex.quote, sys.argv)])
        self.start = time.time()
        hostmem.keep_freed_memory()
        cli.use_compilation_cache()  # before anything compiles

    def log(self, message: str) -> None:
        print(f"[{self.name} {time.time() - self.start:6.0f} s] {message}", flush=True)

    def sweep(self, sweep_name: str, root: Path | None = None) -> list[dict]:
        """The rows of experiments/sweeps/<sweep_name>.py, run (or found done) under the root."""
        sweep = sweep_lib.Sweep(SWEEPS / f"{sweep_name}.py", quick=self.quick)
        self.link_shared_points(sweep, root or self.root)
        rows = sweep_lib.run_sweep(sweep, root or self.root, log=self.log, in_process=True)
        failed = [r["point"] for r in rows if r["status"] != "done"]
        if failed:
            raise SystemExit(f"{self.name}: points failed: {', '.join(failed)}")
        return rows

    def shared_root(self, sweep_name: str) -> Path:
        """The workdirs of a sweep that studies share, beside the study's own."""
        return self.root.parent / root_name(sweep_name, self.quick)

    def link_shared_points(self, sweep: sweep_lib.Sweep, root: Path) -> None:
        """A point whose config is that of the shared digits checkpoint (`default_workdir()`:
        eps, L_simple, the linear schedule) becomes a link to its workdir, so that it is trained
        and evaluated once for all the studies."""
        shared = self.shared_root("digits") / "base"
        config = sweep_lib.Sweep(SWEEPS / "digits.py", quick=self.quick).config_of(0).to_dict()
        for i, name in enumerate(sweep.names):
            link = root / name
            if sweep.config_of(i).to_dict() == config and not (link.exists() or link.is_symlink()):
                shared.mkdir(parents=True, exist_ok=True)
                root.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(shared, root))
                self.log(f"{name}: the shared digits checkpoint, {shared}")

    def default_workdir(self, sweep_name: str = "digits") -> Path:
        """The workdir of the one-point sweep `sweep_name` (`digits`: configs/ddpm_digits.py:short,
        shared by the studies that evaluate one checkpoint; `default`: the README's config),
        trained if absent beside the study's root (runs/studies/<sweep_name>)."""
        root = self.shared_root(sweep_name)
        sweep = sweep_lib.Sweep(SWEEPS / f"{sweep_name}.py", quick=self.quick)
        sweep.evaluations = []  # the studies score it themselves
        sweep_lib.run_sweep(sweep, root, log=self.log, in_process=True)
        return root / "base"

    def write(self, rows: list[dict], figure=None, notes: str = "") -> str:
        """NAME.csv, NAME.md (table, command, wall time, notes) and NAME.png (the matplotlib
        figure given); prints the Markdown table and returns it."""
        self.out.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        with open(self.out / f"{self.name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows({c: cell(r.get(c)) for c in columns} for r in rows)
        table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
        table += [f"| {' | '.join(cell(r.get(c)) for c in columns)} |" for r in rows]
        seconds = time.time() - self.start
        text = "\n".join(table)
        footer = (
            f"`{self.command}`: {seconds:.0f} s wall on this machine (this invocation; work "
            "found done in its workdirs is not redone)."
        )
        (self.out / f"{self.name}.md").write_text(
            f"{text}\n\n{footer}\n" + (f"\n{notes}\n" if notes else "")
        )
        if figure is not None:
            figure.savefig(self.out / f"{self.name}.png", dpi=100, bbox_inches="tight")
        print(text + "\n\n" + footer, flush=True)
        return text


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


class DigitsScores:
    """FD against the training digits and the class IS, of uint8 images held in memory, with
    the evaluate CLI's feature network and cached reference statistics."""

    def __init__(self, config):
        self.network = evaluate.feature_network(config, "fid")
        self.reference = evaluate.reference_statistics(config, self.network)

    def fd(self, images: np.ndarray) -> float:
        mu, sigma = metrics.feature_statistics(self.network.features(images))
        return float(metrics.frechet_distance(mu, sigma, *self.reference[:2]))

    def spread(self, images: np.ndarray) -> float:
        """Diversity: the trace of the images' feature covariance over the training digits'
        (1: as spread out as the data; a collapsed sampler scores near 0)."""
        _, sigma = metrics.feature_statistics(self.network.features(images))
        return float(np.trace(sigma) / np.trace(self.reference[1]))

    def row(self, images: np.ndarray, **fields) -> dict:
        """`fields` and the images' FD, class IS and diversity (`spread`), a table row."""
        scores = dict(FD=self.fd(images), IS=self.inception_score(images))
        return dict(fields, **scores, diversity=self.spread(images))

    def inception_score(self, images: np.ndarray) -> float:
        logits = self.network.logits(images)
        return float(metrics.inception_score(logits, evaluate.IS_SPLITS, from_logits=True)[0])


def bar_figure(rows: list[dict], label: str, metrics_: dict[str, str]):
    """A dot plot per metric column ({column: axis title}), one row of dots per table row,
    labelled by its `label` column; a log axis where one value is 100x another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r[label]) for r in rows]
    fig, axes = plt.subplots(
        1, len(metrics_), figsize=(2.6 * len(metrics_) + 2, 0.4 * len(rows) + 1), sharey=True
    )
    for ax, (column, title) in zip(np.atleast_1d(axes), metrics_.items(), strict=True):
        values = [float(r[column]) for r in rows]
        ax.plot(values, range(len(rows)), "o", color="tab:blue")
        if min(values) > 0 and max(values) > 100 * min(values):
            ax.set_xscale("log")  # one point far off the others (x0's bits/dim)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].set_yticks(range(len(rows)), names)
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.tight_layout()
    return fig


def sweep_study(name: str, doc: str, sweep_name: str | None = None) -> list[dict]:
    """A study that is one sweep: its points' FD, IS, test bits/dim and training time, in a
    table and bar charts."""
    study = Study(name, doc)
    rows = study.sweep(sweep_name or name)
    table = [
        {
            "point": r["point"],
            "FD": r["fid"],
            "IS": r["is"],
            "test bits/dim": r["test_bpd"],
            "final loss": r["loss"],
            "train s": r["train_seconds"],
        }
        for r in rows
    ]
    figure = bar_figure(
        table, "point", {"FD": "FD (lower: closer)", "IS": "class IS", "test bits/dim": "bits/dim"}
    )
    study.write(table, figure)
    return table


def sample_images(wd, num_samples: int, *, seed=0, var_type=None, cache_dir=None, **options):
    """(uint8 images, seconds) from a loaded workdir with sampler options (sample CLI's names)
    and, optionally, another reverse variance than the trained one. With cache_dir (a folder in
    the checkpoint's workdir), images drawn before from the same checkpoint step with the same
    options, variance, count and seed are read back with the seconds they took when drawn: the
    studies that evaluate one checkpoint draw a shared chain once, and a rerun resumes."""
    from diffusion_jax import sample

    if var_type is not None:
        config = copy.deepcopy(wd.config)
        config.diffusion.var_type = var_type
        wd = wd._replace(config=config)
    options = sample.sampler_options(wd.config, **options)
    key = dict(options, step=wd.step, num_samples=num_samples, seed=seed)
    key.pop("batch_size")  # the images do not depend on it
    key["var_type"] = wd.config.diffusion.var_type
    text = json.dumps(key, sort_keys=True)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.npz"
        if path.is_file():
            with np.load(path) as f:
                if str(f["key"]) == text:
                    return f["images"], float(f["seconds"])
    start = time.time()
    images = sample.sample_workdir(wd, num_samples, options, seed=seed)
    seconds = time.time() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")  # whole files only
        np.savez(partial, images=images, seconds=seconds, key=text)
        os.replace(partial, path)
    return images, seconds


def line_figure(rows: list[dict], x: str, series: str, metrics_: dict[str, str], logx=True):
    """One panel per metric column: the metric against column x, one line per value of the
    column `series`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics_), figsize=(3.6 * len(metrics_), 3))
    for ax, (column, title) in zip(np.atleast_1d(axes), metrics_.items(), strict=True):
        for name in dict.fromkeys(r[series] for r in rows):
            points = sorted((r[x], r[column]) for r in rows if r[series] == name)
            ax.plot(*zip(*points, strict=True), marker="o", label=str(name))
        ax.set_xscale("log" if logx else "linear")
        ax.set_xlabel(x)
        ax.set_title(title)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
