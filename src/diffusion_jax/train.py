"""Train a diffusion model: `python -m diffusion_jax.train --config=configs/X.py --workdir=W`.

Any config field can be overridden (`--config.training.batch_size=64`). Running the same
command on the same workdir resumes from its newest readable checkpoint, exactly: the batch
and the randomness of step s depend only on (seed, s). SIGTERM / SIGINT save a checkpoint and
exit 0. The workdir gets config.json, checkpoints/, metrics.jsonl, tensorboard/ and
samples/step_NNNNNN.png.

A bad config or flag exits 2 with one line on stderr, `error: ...`, before anything compiles.
After a crash, the same command resumes from the newest checkpoint that reads back intact, and
metrics.jsonl and the TensorBoard events are rewound to that step, so every logged step appears
once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from diffusion_jax import (
    checkpointing,
    data,
    generate,
    grid,
    hostmem,
    models,
    parallel,
    training,
)
from diffusion_jax.cli import USER_ERRORS, UserError, quiet_libraries, use_compilation_cache
from diffusion_jax.validation import check_devices, validate_config

# Fields that fix the shapes of the parameters: a workdir trained with other values cannot be
# resumed with this config.
SHAPE_FIELDS = (
    "model.name",
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.num_heads",
    "model.num_classes",
    "model.resamp_with_conv",
    "data.image_size",
    "data.num_channels",
    "diffusion.var_type",
    "optim.optimizer",
)


def _field(cfg: dict, field: str):
    node = cfg
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return list(node) if isinstance(node, tuple) else node


def check_workdir_config(workdir: Path, config) -> None:
    """Refuse to resume a workdir whose saved config has other parameter shapes."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    new = json.loads(config.to_json())
    for field in SHAPE_FIELDS:
        old_value, new_value = _field(saved, field), _field(new, field)
        if old_value != new_value:
            raise UserError(
                f"workdir {workdir} was trained with config.{field}={old_value!r} but this config "
                f"has {new_value!r}: use a new --workdir, or pass --config.{field}={old_value!r}"
            )


def _write_atomically(path: Path, text: str) -> None:
    """Readers (and a crash) see the old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard events, process 0 only.

    Opened at `start_step` (the step the run resumes from), it first drops what a crashed run
    logged after that step, and any line cut short by the crash: those steps are logged again.
    Non-finite values are written as null (metrics.jsonl stays strict JSON).
    """

    def __init__(self, workdir: Path, start_step: int):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = workdir / "metrics.jsonl"
            if path.exists():
                _write_atomically(path, "".join(_lines_until(path, start_step)))
            self._jsonl = open(path, "a")
            # purge_step: TensorBoard hides the events a crashed run wrote after start_step.
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {
            k: v if not isinstance(v, float) or math.isfinite(v) else None
            for k, v in metrics.items()
        }
        self._jsonl.write(json.dumps({"step": step, **record}, allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _lines_until(path: Path, step: int) -> list[str]:
    """The complete lines of a metrics.jsonl that log steps <= step."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class StopRequest:
    """Set by SIGTERM / SIGINT; the loop saves and exits at the next step boundary.

    A context manager: the handlers are installed on entry (from the main thread) and the
    previous ones restored on exit, so train() can be called in-process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint and stopping", self.signal)

    def requested(self, step: int, every: int) -> bool:
        """True when any process was asked to stop (processes agree every `every` steps)."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % every:
            return False
        flags_ = multihost_utils.process_allgather(np.array(self.signal is not None))
        return bool(np.any(flags_))


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def train(config, workdir) -> dict:
    """Train (or resume) in `workdir`; returns the last logged metrics.

    Raises ConfigError / UserError for bad input, before anything compiles.
    """
    quiet_libraries()
    validate_config(config)  # numpy only: before JAX starts and before joining peers
    workdir = Path(workdir)
    check_workdir_config(workdir, config)  # every process reads before process 0 writes
    with StopRequest() as stop:
        parallel.initialize_distributed(config.distributed)
        check_devices(config, num_devices=jax.device_count(), process_count=jax.process_count())
        return _train(config, workdir, stop)


def _train(config, workdir: Path, stop: StopRequest) -> dict:
    tc = config.training
    try:
        source = data.create_source(config.data, split="train")
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"config.data.dataset={config.data.dataset!r}: {e}") from None
    if tc.batch_size > len(source):
        raise UserError(
            f"config.training.batch_size={tc.batch_size} is larger than the {len(source)} "
            f"training examples of {config.data.dataset!r}"
        )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_atomically(workdir / "config.json", config.to_json(indent=2))

    mesh = parallel.make_mesh()
    model = models.create_model(training.model_config(config))
    schedule = training.make_schedule(config)
    optimizer, lr_schedule = training.make_optimizer(config)
    init_key, step_key, preview_key = jax.random.split(jax.random.key(config.seed), 3)
    repl = parallel.replicated(mesh)
    init = jax.jit(lambda k: training.init_state(model, optimizer, config, k), out_shardings=repl)

    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
    abstract = jax.eval_shape(init, init_key)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract
    )
    state, record = ckpt.restore_latest(abstract)
    if state is None:
        if ckpt.steps():
            raise UserError(f"no checkpoint in {ckpt.directory} could be read (see warnings)")
        state = init(init_key)
        logging.info(
            "new run: %s parameters",
            f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
        )
    else:
        logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    start_step = int(state.step)

    step_fn = jax.jit(
        training.make_train_step(model, schedule, config, optimizer, lr_schedule),
        in_shardings=(repl, parallel.batch_sharding(mesh), repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    sample = generate.make_sampler(model, schedule, config, mesh)
    batches = data.create_batches(
        source,
        global_batch_size=tc.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        random_flip=config.data.random_flip,
    )
    writer = MetricsWriter(workdir, start_step)
    last_saved = start_step  # restored from there, or a fresh start: nothing new to save
    last_metrics: dict = {}

    def save(step: int) -> None:
        nonlocal last_saved
        if step != last_saved:
            ckpt.save(step, state, {"loss": last_metrics.get("loss")})
            last_saved = step

    def check_finite(step: int) -> None:
        bad = int(state.nonfinite_steps)
        if bad and tc.nan_policy == "stop":
            first = int(state.first_nonfinite_step)
            ckpt.wait()
            raise UserError(
                f"non-finite loss or gradient at step {first} (update skipped; {bad} such "
                f"steps by step {step}); newest checkpoint kept: step {ckpt.latest_step()}. "
                "Lower optim.lr or set training.nan_policy=skip"
            )

    t_last, step_last = time.time(), start_step
    step = start_step
    try:
        while step < tc.num_train_steps and not stop.requested(step, tc.log_every):
            step += 1
            batch = parallel.global_batch(next(batches)["image"], mesh)
            state, metrics = step_fn(state, batch, step_key)
            if step % tc.log_every == 0 or step == tc.num_train_steps:
                metrics = jax.device_get(metrics)
                now = time.time()
                steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                last_metrics = {
                    "loss": float(metrics["loss"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(metrics["lr"]),
                    "steps_per_sec": steps_per_sec,
                    "examples_per_sec": steps_per_sec * tc.batch_size,
                    "nonfinite_steps": int(state.nonfinite_steps),
                }
                writer.write(step, last_metrics)
                eta = (tc.num_train_steps - step) / max(steps_per_sec, 1e-9)
                logging.info(
                    "step %d/%d  loss %.4f  grad %.3f  lr %.2e  %.2f steps/s  %.0f img/s  ETA %s",
                    step,
                    tc.num_train_steps,
                    last_metrics["loss"],
                    last_metrics["grad_norm"],
                    last_metrics["lr"],
                    steps_per_sec,
                    last_metrics["examples_per_sec"],
                    _format_duration(eta),
                )
                check_finite(step)
            if step % tc.checkpoint_every == 0:
                check_finite(step)
                save(step)
            if tc.sample_every and step % tc.sample_every == 0:
                logging.info("sampling %d previews at step %d", tc.num_preview_samples, step)
                images = sample(state.ema_params, preview_key, tc.num_preview_samples)
                if jax.process_index() == 0:
                    path = grid.save_grid(images, workdir / "samples" / f"step_{step:06d}.png")
                    logging.info("samples: %s", path)
        check_finite(step)
        save(step)
    finally:
        ckpt.close()
        writer.close()
    if stop.signal:
        logging.info("stopped by %s at step %d; checkpoint saved", stop.signal, step)
    return last_metrics


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def _exit_with_error(message: str):
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The message of an error, on one line (ml_collections nests a KeyError's in others')."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with any error (unknown flag or config field, bad value) reported
    as one `error:` line naming the flag, and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _exit_with_error(_one_line(e))
    except OSError as e:  # the config file did not load
        _exit_with_error(f"--config: {_one_line(e)}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections applying a --config.a.b=v override: a misspelt field, a wrong type.
        message = _one_line(e)
        field = message.split()[0].strip("'\"") if message else ""
        culprit = next(
            (a for a in argv[1:] if a.startswith("--config.") and f".{field}" in a.split("=")[0]),
            "a --config override",
        )
        what = "no such config field" if isinstance(e, AttributeError | KeyError) else "bad value"
        _exit_with_error(f"{culprit}: {what} ({message})")


def main(argv):
    del argv
    hostmem.keep_freed_memory()
    use_compilation_cache()
    config = FLAGS.config
    try:
        config.keys()
    except OSError as e:  # ml_collections defers a config file's load error to its first use
        _exit_with_error(f"--config: {_one_line(e)}")
    try:
        train(config, FLAGS.workdir)
    except USER_ERRORS as e:
        _exit_with_error(str(e))
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # A failed collective (gloo "Connection reset by peer", ...) surfaces as one of several
        # exception types. Exit at once: JAX's exit-time shutdown would wait for the lost
        # process until heartbeat_timeout, then abort.
        logging.exception("process %d failed", jax.process_index())
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} failed: "
            f"{type(e).__name__}: {_one_line(e)}; in a multi-process run this usually means "
            "that another process died or hangs (see its log)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
