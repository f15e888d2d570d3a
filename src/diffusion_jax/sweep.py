"""Run a sweep of configs: `python -m diffusion_jax.sweep --sweep=experiments/sweeps/S.py
[--config=configs/X.py[:variant]] [--workdir_root=DIR] [--print_only] [--quick]`.

A sweep file is plain Python with
- `CONFIG`: the base config spec ("configs/ddpm_digits.py" or "configs/x.py:variant"); the
  `--config` flag replaces it;
- `get_points()`: the points, each a dict of dotted config fields to values, built with
  `product` and `zipped` from this module (or any list of dicts);
- optionally `EVALUATE`: a list of evaluations run on each trained point, each a dict of the
  evaluate CLI's flags (`{"metric": "fid", "num_samples": 1000, "sampler": "ddim", "steps":
  50}`), with an optional "name" for its table column (default: the metric, then the other
  flags); "metric": "fid,is" scores one sampling by each, a column per metric (named by the
  metric, after "name" and "_" when one is given);
- optionally `QUICK`: {"config": {field: value}, "evaluate": {flag: value}} applied to every
  point and evaluation by `--quick` (a smoke run: few steps, few samples).
A sweep file may import what several share from a module beside it (experiments/sweeps/
_digits.py).

Each point trains in its own workdir, DIR/<point name> (`point_name`: its overrides,
`field=value` joined by commas, the field by its last component where that is unambiguous),
by exactly the command that `--print_only` prints (`python -m diffusion_jax.train
--config=... --workdir=... --config.a.b=v ...`, one line per point, for a cluster scheduler: a
SLURM array, xmanager), and is evaluated by the evaluate CLI. `--in_process` runs both in the
sweep's own process instead (`train.train` on the same config, `evaluate.run` on the same
flags): no start-up per command and the programs that points share compile once, at the price
of isolation (a crash ends the sweep). Here the points run one after another: a point whose
newest checkpoint is at config.training.num_train_steps is not trained again, an interrupted
one resumes (the train CLI resumes exactly), and an evaluation already recorded in the point's
`sweep_results.json` with the same flags is not run again. After each point, DIR/results.csv
and DIR/results.md collect every point's overrides, final training loss, training time and
evaluations. Every point's config is validated (numpy only, nothing compiles) before the first
one starts; a point that fails is reported and the others still run (exit 1 at the end).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import itertools
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from absl import app, flags

from diffusion_jax import cli, hostmem
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.config import load_config, override
from diffusion_jax.validation import validate_config

RESULTS_FILE = "sweep_results.json"  # in each point's workdir: its evaluations and train time


def product(*axes: Mapping[str, Sequence] | Sequence[dict]) -> list[dict]:
    """The Cartesian product of the axes, the last varying fastest. An axis is a mapping
    {field: [values]} (itself a product of its fields) or a list of points (from `zipped`)."""
    expanded = [_points(axis) for axis in axes]
    return [_merge(combo) for combo in itertools.product(*expanded)]


def zipped(fields: Mapping[str, Sequence]) -> list[dict]:
    """Points that take the i-th value of every field together; the lists must be as long."""
    lengths = {len(values) for values in fields.values()}
    if len(lengths) > 1:
        raise ValueError(f"zipped: the value lists differ in length ({sorted(lengths)})")
    return [dict(zip(fields, values, strict=True)) for values in zip(*fields.values(), strict=True)]


def _points(axis) -> list[dict]:
    if isinstance(axis, Mapping):
        combos = itertools.product(*axis.values())
        return [dict(zip(axis, values, strict=True)) for values in combos]
    return [dict(point) for point in axis]


def _merge(points: Iterable[dict]) -> dict:
    merged: dict = {}
    for point in points:
        repeated = set(merged) & set(point)
        if repeated:
            raise ValueError(f"a sweep sets {sorted(repeated)} twice in one point")
        merged.update(point)
    return merged


def _short_names(fields: Iterable[str]) -> dict[str, str]:
    """Each dotted field by its last component, or in full where two share that component."""
    fields = list(dict.fromkeys(fields))
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last, strict=True)}


def _text(value) -> str:
    """A value as a `--config.a.b=` flag spells it (ml_collections parses it back)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "(" + "".join(f"{_text(v)}," for v in value) + ")"
    return str(value)


def _name_text(value) -> str:
    if isinstance(value, list | tuple):
        return "-".join(_name_text(v) for v in value)
    return _text(value)


def point_name(point: Mapping, short: Mapping[str, str] | None = None) -> str:
    """The point's workdir name: `field=value` joined by commas ("parameterization=v,seed=0",
    "ch_mult=1-2-2" for a tuple)."""
    short = short or _short_names(point)
    text = ",".join(f"{short[f]}={_name_text(v)}" for f, v in point.items()) or "base"
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in text)


class Sweep:
    """A loaded sweep file: its base config spec, points, evaluations (with --quick applied)."""

    def __init__(self, path, config: str | None = None, quick: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"sweep file {str(path)!r} does not exist")
        spec = importlib.util.spec_from_file_location(self.path.stem, self.path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(self.path.parent))  # sweep files may share a sibling module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(self.path.parent))
        for name in ("CONFIG", "get_points"):
            if not hasattr(module, name):
                raise ValueError(f"sweep file {str(path)!r} defines no {name}")
        self.config = config or module.CONFIG
        quick_values = getattr(module, "QUICK", {}) if quick else {}
        self.extra = dict(quick_values.get("config", {}))
        self.points = [dict(p) for p in module.get_points()]
        if not self.points:
            raise ValueError(f"sweep file {str(path)!r} has no points")
        self.short = _short_names(f for p in self.points for f in p)
        self.names = [point_name(p, self.short) for p in self.points]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"sweep file {str(path)!r} repeats a point")
        # Column names come from the evaluations as written, so --quick keeps them.
        self.evaluations = [
            dict(e, columns=evaluation_columns(e), **quick_values.get("evaluate", {}))
            for e in getattr(module, "EVALUATE", [])
        ]

    def overrides(self, i: int) -> dict:
        """Point i's config fields: its own values, then the --quick ones."""
        return {**self.points[i], **self.extra}

    def config_of(self, i: int):
        """Point i's config, validated (numpy only); a ValueError names the point."""
        try:
            config = override(load_config(self.config), self.overrides(i))
            validate_config(config)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"sweep point {self.names[i]}: {e}") from None
        return config

    def train_command(self, i: int, root: Path, python: str = "python") -> list[str]:
        """The train CLI's argv for point i, in DIR/<point name>."""
        return [
            python,
            "-m",
            "diffusion_jax.train",
            f"--config={self.config}",
            f"--workdir={root / self.names[i]}",
            *(f"--config.{field}={_text(v)}" for field, v in self.overrides(i).items()),
        ]


def evaluation_columns(evaluation: Mapping) -> list[str]:
    """The table columns of an evaluation, one per metric: its "name" (or "name_metric" for
    several metrics); without one, its metric and other flags (or the metric alone for
    several)."""
    names = evaluation["metric"].split(",")
    if len(names) > 1:
        prefix = f"{evaluation['name']}_" if "name" in evaluation else ""
        return [prefix + name for name in names]
    if "name" in evaluation:
        return [str(evaluation["name"])]
    rest = ",".join(f"{k}={v}" for k, v in evaluation.items() if k != "metric")
    return [evaluation["metric"] + (f"[{rest}]" if rest else "")]


def evaluate_command(evaluation: Mapping, workdir: Path, python: str = "python") -> list[str]:
    """The evaluate CLI's argv for one evaluation of a point."""
    flags = [f"--{k}={_text(v)}" for k, v in evaluation.items() if k not in ("name", "columns")]
    return [python, "-m", "diffusion_jax.evaluate", f"--workdir={workdir}", *flags]


def latest_checkpoint_step(workdir: Path) -> int | None:
    """The step of the newest finished checkpoint (orbax renames a step's directory into
    place only once it is complete), None without any."""
    directory = Path(workdir) / workdir_lib.CHECKPOINT_DIR
    steps = [int(p.name) for p in directory.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def final_loss(workdir: Path) -> float | None:
    """The loss of the last line of the point's metrics.jsonl."""
    path = Path(workdir) / workdir_lib.METRICS_FILE
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]).get("loss") if lines else None


def _read_results(workdir: Path) -> dict:
    path = Path(workdir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {"evaluations": {}}


def _write_results(workdir: Path, results: dict) -> None:
    path = Path(workdir) / RESULTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def _run(argv: list[str], log) -> subprocess.CompletedProcess:
    """Run a CLI, its stderr (absl's progress lines) passed through, its stdout kept. On
    Ctrl-C the CLI (in the same process group) gets the SIGINT too: the train CLI saves a
    checkpoint and exits, which is waited for before the KeyboardInterrupt goes on."""
    log(" ".join(shlex.quote(a) for a in argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate()
    except KeyboardInterrupt:
        log("interrupted: waiting for it to save and exit")
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out)


def _train_subprocess(sweep: Sweep, i: int, root: Path, log) -> None:
    """The train CLI on point i; RuntimeError unless it reaches the last step."""
    returncode = _run(sweep.train_command(i, root, sys.executable), log).returncode
    step = latest_checkpoint_step(root / sweep.names[i])
    if returncode != 0 or step is None or step < sweep.config_of(i).training.num_train_steps:
        raise RuntimeError(f"training stopped at step {step} (exit code {returncode})")


def _train_in_process(sweep: Sweep, i: int, root: Path, log) -> None:
    """train.train on point i's config, in this process. Ctrl-C makes the train loop save a
    checkpoint and return; that is passed on as KeyboardInterrupt."""
    from diffusion_jax import train

    log("in this process: " + shlex.join(sweep.train_command(i, root)))
    config = sweep.config_of(i)
    try:
        train.train(config, root / sweep.names[i])
    except (cli.UserError, ValueError) as e:
        raise RuntimeError(f"training refused: {cli.one_line(e)}") from None
    if (latest_checkpoint_step(root / sweep.names[i]) or 0) < config.training.num_train_steps:
        log("interrupted: checkpoint saved")
        raise KeyboardInterrupt


def _evaluate(evaluation: Mapping, workdir: Path, in_process: bool, log) -> list[dict]:
    """The evaluate CLI's records (one per metric) for one evaluation of a point."""
    if in_process:
        from diffusion_jax import evaluate

        log("in this process: " + shlex.join(evaluate_command(evaluation, workdir)))
        flags_ = {k: v for k, v in evaluation.items() if k not in ("name", "columns")}
        try:
            return evaluate.run(workdir=str(workdir), **flags_)
        except (cli.UserError, ValueError, TypeError) as e:
            raise RuntimeError(f"evaluation {evaluation['columns']}: {cli.one_line(e)}") from None
    proc = _run(evaluate_command(evaluation, workdir, sys.executable), log)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) < len(evaluation["columns"]):
        raise RuntimeError(
            f"evaluation {evaluation['columns']} failed (exit code {proc.returncode})"
        )
    return [json.loads(line) for line in lines[-len(evaluation["columns"]) :]]


def run_point(sweep: Sweep, i: int, root: Path, log=print, in_process: bool = False) -> dict:
    """Train point i unless finished, then run its missing evaluations; returns its row."""
    config = sweep.config_of(i)
    workdir = root / sweep.names[i]
    results = _read_results(workdir)
    target = config.training.num_train_steps
    step = latest_checkpoint_step(workdir)
    if step is not None and step >= target:
        log(f"trained: step {step} of {target}")
    else:
        log(f"training from step {step or 0} of {target}")
        start = time.time()
        try:
            (_train_in_process if in_process else _train_subprocess)(sweep, i, root, log)
        finally:
            results["train_seconds"] = round(
                results.get("train_seconds", 0) + time.time() - start, 1
            )
            workdir.mkdir(parents=True, exist_ok=True)
            _write_results(workdir, results)
        step = latest_checkpoint_step(workdir)
    for evaluation in sweep.evaluations:
        columns = evaluation["columns"]
        done = [results["evaluations"].get(c) for c in columns]
        if all(d and d["flags"] == evaluation and d["step"] == step for d in done):
            recorded = zip(columns, done, strict=True)
            log(", ".join(f"{c}: {d['value']}" for c, d in recorded) + " (recorded)")
            continue
        records = _evaluate(evaluation, workdir, in_process, log)
        for column, record in zip(columns, records, strict=True):
            value = record.get("value", record.get("total_bpd"))
            results["evaluations"][column] = dict(flags=evaluation, step=step, value=value)
            log(f"{column}: {value}")
        _write_results(workdir, results)
    return row(sweep, i, root)


def row(sweep: Sweep, i: int, root: Path, status: str = "done") -> dict:
    """Point i's table row from its workdir: overrides, status, loss, time, evaluations."""
    workdir = root / sweep.names[i]
    results = _read_results(workdir)
    out = {"point": sweep.names[i]}
    out.update((sweep.short[f], _text(v)) for f, v in sweep.points[i].items())
    out.update(status=status, step=latest_checkpoint_step(workdir), loss=final_loss(workdir))
    out["train_seconds"] = results.get("train_seconds")
    for column in (c for e in sweep.evaluations for c in e["columns"]):
        recorded = results["evaluations"].get(column)
        out[column] = recorded["value"] if recorded else None
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_table(rows: list[dict], root: Path) -> tuple[Path, Path]:
    """DIR/results.csv and DIR/results.md: one row per point."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    root.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = root / "results.csv", root / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _point_log(log, name: str, message: str) -> None:
    log(f"  {name}: {message}")


def run_sweep(sweep: Sweep, root: Path, log=print, in_process: bool = False) -> list[dict]:
    """Every point in turn (see the module docstring); returns the rows written to the table.
    With in_process, call cli.use_compilation_cache() first, before anything compiles."""
    for i in range(len(sweep.points)):
        sweep.config_of(i)
    rows = [row(sweep, i, root, status="pending") for i in range(len(sweep.points))]
    start = time.time()
    for i, name in enumerate(sweep.names):
        log(f"[{i + 1}/{len(rows)}] {name} ({time.time() - start:.0f} s into the sweep)")
        try:
            point_log = functools.partial(_point_log, log, name)
            rows[i] = run_point(sweep, i, root, point_log, in_process)
        except RuntimeError as e:
            rows[i] = row(sweep, i, root, status=f"failed: {e}")
            log(f"  {name}: FAILED: {e}")
        csv_path, md_path = write_table(rows, root)
    log(f"table: {csv_path} and {md_path}")
    return rows


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        cli.require_flags("sweep")
        try:
            sweep = Sweep(f.sweep, config=f.config, quick=f.quick)
            for i in range(len(sweep.points)):
                sweep.config_of(i)
        except (ValueError, OSError) as e:
            raise cli.UserError(cli.one_line(e)) from None
        root = Path(f.workdir_root or Path("runs") / "sweeps" / sweep.path.stem)
        if f.print_only:
            for i in range(len(sweep.points)):
                print(" ".join(shlex.quote(a) for a in sweep.train_command(i, root)))
            return
        if f.in_process:
            hostmem.keep_freed_memory()
            cli.use_compilation_cache()
        try:
            rows = run_sweep(
                sweep, root, log=lambda m: print(m, flush=True), in_process=f.in_process
            )
        except KeyboardInterrupt:
            print("sweep interrupted: the same command resumes it", file=sys.stderr)
            sys.exit(130)
    if any(r["status"] != "done" for r in rows):
        sys.exit(1)


def define_flags() -> None:
    flags.DEFINE_string("sweep", None, "A sweep file (experiments/sweeps/NAME.py).")
    flags.DEFINE_string("config", None, "The base config spec (default: the sweep's CONFIG).")
    flags.DEFINE_string(
        "workdir_root", None, "Where the points' workdirs go (default runs/sweeps/<sweep>)."
    )
    flags.DEFINE_bool("print_only", False, "Print each point's train command; run nothing.")
    flags.DEFINE_bool("quick", False, "Apply the sweep's QUICK overrides (a smoke run).")
    flags.DEFINE_bool(
        "in_process",
        False,
        "Train and evaluate in this process (no start-up per command; a crash ends the sweep).",
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
