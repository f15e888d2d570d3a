"""Orbax checkpoints of the TrainState: save (async, atomic), keep N, restore, resume.

A checkpoint holds the whole TrainState (params, EMA params, optimizer state, step, NaN
counters) and a JSON record. The data position needs no state of its own: the batch of step s
is a pure function of (seed, s), so restoring the step restores the data stream.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash mid-save leaves the previous checkpoint usable (the half-written temporary directory is
removed when the checkpoints are next opened). The record holds the SHA-256 of the state's
bytes, checked on restore: orbax itself does not notice flipped bits in array data. A
checkpoint that cannot be read or fails the check is moved aside into
`<checkpoints>_unreadable/` (never deleted) and the next older one is used.

Before reading any array, a restore compares the checkpoint's saved tree (orbax's metadata: each
leaf's path, shape and dtype) with the state the caller expects. A difference means another
config made the checkpoint (another model, or grad_clip switched on or off, which adds or
removes optax's clipping state), not corruption: restore raises IncompatibleCheckpoint and
leaves the checkpoint where it is.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected, or one that fails its checksum."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint whose state tree differs from the expected one (paths, shapes, dtypes)."""

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


LISTED = 3  # differing leaves named per kind in an IncompatibleCheckpoint message


def _leaf_name(path) -> str:
    """A leaf's path as orbax names it in the tree metadata: keys joined by dots."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _spec(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def tree_specs(tree) -> dict[str, str]:
    """{leaf name: "dtype[shape]"} of a pytree of arrays or ShapeDtypeStructs."""
    return {
        _leaf_name(path): _spec(leaf.shape, leaf.dtype)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def tree_differences(saved: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """What differs between two tree_specs, a few leaves of each kind named."""

    def listed(kind: str, items: list[str]) -> list[str]:
        more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
        return [f"{kind}: {', '.join(items[:LISTED])}{more}"] if items else []

    changed = [
        f"{k} {saved[k]} -> {wanted[k]}"
        for k in sorted(saved)
        if saved[k] != wanted.get(k, saved[k])
    ]
    return (
        listed("only in the checkpoint", sorted(saved.keys() - wanted.keys()))
        + listed("only in this config's state", sorted(wanted.keys() - saved.keys()))
        + listed("changed", changed)
    )


def state_digest(state) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes (leaves replicated or addressable)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated:
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype.str} {array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Checkpointer:
    """A CheckpointManager over `directory` for one TrainState structure."""

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "record")
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, record: dict | None = None) -> bool:
        """Start saving `state` as checkpoint `step` (returns at once when async)."""
        if step in self._manager.all_steps():
            return False
        record = dict(
            record or {}, step=int(step), saved_at=time.time(), state_sha256=state_digest(state)
        )
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
        )

    def wait(self) -> None:
        """Block until async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, abstract_state):
        """(state, record) of checkpoint `step`; abstract_state gives structure and sharding.

        Raises IncompatibleCheckpoint, before reading any array, if the saved tree differs from
        abstract_state's; CheckpointError if the state does not match the checksum saved with it.
        """
        differences = tree_differences(self.saved_specs(step), tree_specs(abstract_state))
        if differences:
            raise IncompatibleCheckpoint(
                f"checkpoint {self.directory / str(step)} holds another state than this config "
                f"makes ({'; '.join(differences)})",
                differences,
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
            ),
        )
        record = dict(out.record)
        expected = record.get("state_sha256")
        if expected is not None and state_digest(out.state) != expected:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)}: the state's bytes do not match the "
                "SHA-256 saved with them (corrupted on disk)"
            )
        return out.state, record

    def saved_specs(self, step: int) -> dict[str, str]:
        """tree_specs of the state saved in checkpoint `step`, from its metadata alone."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            metadata = handler.metadata(epath.Path(self.directory / str(step) / "state"))
        finally:
            handler.close()
        return {leaf.name: _spec(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(metadata.tree)}

    def restore_fields(self, step: int, abstract_fields: dict):
        """(fields, record) of checkpoint `step`, reading only the TrainState fields named in
        `abstract_fields` (e.g. {"step": ..., "ema_params": ...}): sampling needs neither the
        raw params nor the optimizer state, which would triple the memory with Adam."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_fields)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                ),
                record=ocp.args.JsonRestore(),
            ),
        )
        return dict(out.state), dict(out.record)

    def restore_latest(self, abstract_state):
        """Restore the newest readable checkpoint: (state, record), or (None, None) if none.

        Unreadable checkpoints are moved aside with a warning, never deleted; an
        IncompatibleCheckpoint is raised as it is, the checkpoint left in place.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_state)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
                self._quarantine(step, e)
        return None, None

    @property
    def unreadable_directory(self) -> Path:
        return self.directory.with_name(self.directory.name + "_unreadable")

    def _quarantine(self, step: int, error: Exception) -> None:
        src = self.directory / str(step)
        dest_dir = self.unreadable_directory
        dest = dest_dir / f"{step}-{int(time.time())}"
        logging.warning(
            "checkpoint %s cannot be read (%s: %s); moved to %s, trying an older one",
            src,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            dest,
        )
        if jax.process_index() == 0:
            dest_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.close()
        self._manager = self._open()
