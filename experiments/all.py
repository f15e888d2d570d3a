"""Every study, one command: `python experiments/all.py [--quick] [--jobs=N] [--workdir_root=DIR]
[NAME ...]` (NAME: only these studies, e.g. to rerun or resume some).

First the digits checkpoint that several studies share (experiments/sweeps/digits.py, trained
and evaluated as the training studies evaluate their points), so that no two studies train or
evaluate it at once; then each study in its own process (`python experiments/NAME.py`), N at
a time (default 1: the studies' own wall times stay those of a quiet machine), longest first.
Each study works in <root>/NAME (NAME_quick with --quick; root: DIR, else runs/studies, the
studies' own default) and logs to <root>/NAME.log; each writes its results as it does alone.
Prints a line as each study ends, then one JSON line (each study's exit code and wall time, the
total); exits 1 if any study failed, 130 on Ctrl-C once the running studies have saved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from study_common import REPO, root_name

# Longest first (by the full run's wall times in experiments/README.md), so that N jobs end
# close together; variance follows ddim, whose DDPM chains it reads back.
STUDIES = [
    "sr3_schedule",
    "perception_distortion",
    "ddim",
    "parameterization",
    "digits_table",
    "schedules",
    "guidance",
    "losses",
    "variance",
    "one_step",
]


def run_pool(pending, running, results, jobs: int, root: Path, flags, log) -> None:
    """The studies in `pending`, `jobs` at a time, each with the flags `flags(name)` and its log
    in root; `results`: name -> exit code, seconds."""
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            argv = [sys.executable, f"experiments/{name}.py", *flags(name)]
            out = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed when it ends)
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            running[name] = (proc, out, time.time())
            log(f"{name}: started")
        time.sleep(0.5)
        for name, (proc, out, began) in list(running.items()):
            if proc.poll() is not None:
                out.close()
                del running[name]
                results[name] = dict(exit_code=proc.returncode, seconds=round(time.time() - began))
                log(f"{name}: exit code {proc.returncode}, {results[name]['seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every study's smoke run")
    parser.add_argument("--jobs", type=int, default=1, help="studies run at once")
    parser.add_argument(
        "--workdir_root", default=None, help="the studies' workdirs (default runs/studies)"
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these studies")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(STUDIES))
    if unknown:
        parser.error(f"unknown studies: {', '.join(unknown)} (known: {', '.join(STUDIES)})")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: expected a positive integer")
    root = Path(args.workdir_root or REPO / "runs" / "studies")
    root.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    start = time.time()

    def log(message: str) -> None:
        print(f"[all {time.time() - start:6.0f} s] {message}", flush=True)

    shared = [
        sys.executable,
        "-m",
        "diffusion_jax.sweep",
        f"--sweep={REPO / 'experiments' / 'sweeps' / 'digits.py'}",
        f"--workdir_root={root / root_name('digits', args.quick)}",
        "--in_process",
        *quick,
    ]
    log("the shared digits checkpoint: " + " ".join(shared[1:]))
    with open(root / "digits.log", "w") as out:
        if subprocess.run(shared, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode:
            raise SystemExit(f"the shared digits checkpoint failed: see {root / 'digits.log'}")

    def study_flags(name: str) -> list[str]:
        """--quick, and --workdir_root where DIR is given: a study's results then name the
        command a reader runs alone."""
        workdirs = root / root_name(name, args.quick)  # as the study's default without DIR
        return quick + ([f"--workdir_root={workdirs}"] if args.workdir_root else [])

    pending = [name for name in STUDIES if name in args.names or not args.names]
    running, results = {}, {}
    try:
        run_pool(pending, running, results, args.jobs, root, study_flags, log)
    except KeyboardInterrupt:  # the studies got the SIGINT too: they save and stop
        log(f"interrupted: waiting for {', '.join(running)}; the same command resumes")
        for proc, _, _ in running.values():
            proc.wait()
        sys.exit(130)

    total = round(time.time() - start)
    print(json.dumps(dict(studies=results, total_seconds=total, jobs=args.jobs)))
    failed = [name for name, r in results.items() if r["exit_code"]]
    log(f"{len(results)} studies in {total} s wall ({args.jobs} at a time)")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs in {root})")


if __name__ == "__main__":
    main()
