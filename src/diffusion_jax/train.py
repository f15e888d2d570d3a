"""Train a diffusion model: `python -m diffusion_jax.train --config=configs/X.py [--workdir=W]`.

Any config field can be overridden (`--config.training.batch_size=64`). The workdir defaults to
runs/<config file stem> (runs/X; runs/X_p for a parameterised `--config=configs/X.py:p`).
Running the same command on the same workdir resumes from its newest readable checkpoint,
exactly: the batch and the randomness of step s depend only on (seed, s). SIGTERM / SIGINT save
a checkpoint and exit 0. The workdir gets config.json, checkpoints/, metrics.jsonl, tensorboard/
and samples/step_NNNNNN.png.

A bad config or flag exits 2 with one line on stderr, `error: ...`, before anything compiles; so
does a config whose state does not fit the workdir's checkpoints (another model, or grad_clip
switched on or off). After a crash, the same command resumes from the newest checkpoint that
reads back intact, and metrics.jsonl and the TensorBoard events are rewound to that step, so
every logged step appears once. A workdir whose checkpoints are all unreadable is refused, never
restarted from step 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import (
    checkpointing,
    cli,
    data,
    generate,
    grid,
    hostmem,
    models,
    parallel,
    training,
)
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.cli import UserError
from diffusion_jax.validation import check_devices, validate_config


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def train(config, workdir) -> dict:
    """Train (or resume) in `workdir`; returns the last logged metrics.

    Raises ConfigError / UserError for bad input, before anything compiles.
    """
    cli.quiet_libraries()
    validate_config(config)  # numpy only: before JAX starts and before joining peers
    workdir = Path(workdir)
    saved_config = workdir_lib.saved_config(workdir)  # every process reads before 0 writes
    workdir_lib.check_workdir_config(workdir, saved_config, config)
    with cli.StopRequest() as stop:
        parallel.initialize_distributed(config.distributed)
        check_devices(config, num_devices=jax.device_count(), process_count=jax.process_count())
        return _train(config, workdir, saved_config, stop)


def _restore(ckpt: checkpointing.Checkpointer, abstract, saved_config: dict | None, config):
    """The state of the newest readable checkpoint; None in a workdir that never had one."""
    try:
        state, _ = ckpt.restore_latest(abstract)
    except checkpointing.IncompatibleCheckpoint as e:
        ckpt.close()
        changed = workdir_lib.config_differences(saved_config, config) if saved_config else []
        fields = f"; config.json differs in {', '.join(changed)}" if changed else ""
        raise UserError(
            f"{e}{fields}: resume with the config it was trained with, or use a new --workdir"
        ) from None
    if state is None and ckpt.unreadable_directory.exists():
        ckpt.close()
        raise UserError(
            f"no checkpoint in {ckpt.directory} could be read (moved to "
            f"{ckpt.unreadable_directory}, see the warnings): to train from step 0, use a new "
            "--workdir"
        )
    return state


def _check_classes(config, source) -> None:
    """A class-conditional model must have as many classes as the data source's labels."""
    num_classes = config.model.num_classes
    if num_classes and num_classes != getattr(source, "num_classes", None):
        raise UserError(
            f"config.model.num_classes={num_classes} but {config.data.dataset!r} has "
            f"{getattr(source, 'num_classes', None)} classes: set config.model.num_classes to it "
            "(or 0 for an unconditional model)"
        )


def _train(config, workdir: Path, saved_config: dict | None, stop: cli.StopRequest) -> dict:
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
    _check_classes(config, source)
    mesh = parallel.make_mesh()
    model = models.create_model(training.model_config(config))
    schedule = training.make_schedule(config)
    optimizer, lr_schedule = training.make_optimizer(config)
    init_key, step_key, preview_key = jax.random.split(jax.random.key(config.seed), 3)
    repl = parallel.replicated(mesh)
    init = jax.jit(lambda k: training.init_state(model, optimizer, config, k), out_shardings=repl)

    ckpt = checkpointing.Checkpointer(
        workdir / workdir_lib.CHECKPOINT_DIR, keep=tc.keep_checkpoints
    )
    abstract = jax.eval_shape(init, init_key)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract
    )
    state = _restore(ckpt, abstract, saved_config, config)
    if jax.process_index() == 0:
        workdir_lib.write_config(workdir, config)
    if state is None:
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
    preview_conditions = generate.preview_conditions(config, source, tc.num_preview_samples)
    batches = data.create_batches(
        source,
        global_batch_size=tc.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        random_flip=config.data.random_flip,
    )
    writer = workdir_lib.MetricsWriter(workdir, start_step)
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
            batch = parallel.global_batch(next(batches), mesh)
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
                n = tc.num_preview_samples
                labels = generate.cycled_labels(config, n)
                images = sample(
                    state.ema_params, preview_key, n, labels=labels, conditions=preview_conditions
                )
                if jax.process_index() == 0:
                    path = workdir / "samples" / f"step_{step:06d}.png"
                    if labels is None:
                        path = grid.save_grid(images, path)
                    else:
                        path = grid.save_class_grid(images, labels, path)
                    logging.info("samples: %s", path)
        check_finite(step)
        save(step)
    finally:
        ckpt.close()
        writer.close()
    if stop.signal:
        logging.info("stopped by %s at step %d; checkpoint saved", stop.signal, step)
    return last_metrics


def define_flags() -> None:
    """The CLI's flags (defined by the CLI only, so that importing train() defines none)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics and samples (default: runs/<config>)."
    )
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    hostmem.keep_freed_memory()
    cli.use_compilation_cache()
    config = cli.loaded_config("config")
    f = flags.FLAGS
    workdir = f.workdir or cli.default_workdir(f["config"].config_filename)
    logging.info("workdir: %s", workdir)
    with cli.user_errors(), cli.peer_failures():
        train(config, workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
