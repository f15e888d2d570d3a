"""Faults injected into training runs: kills, preemption, corrupt checkpoints, NaNs, bad files.

Every run that is interrupted or damaged must end where an undisturbed run ends: the same
parameters, EMA parameters and optimizer state, bit for bit, and the same logged losses, each
step logged once. The undisturbed run is the session's reference (train_harness.reference_run);
kills go to the CLI in a subprocess, restarts run in-process or through the CLI (both use 8
emulated devices and give identical bits).
"""

import ast
import gc
import logging
import re
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_harness import (
    Run,
    assert_states_equal,
    checkpoint_steps,
    load_state,
    losses,
    read_metrics,
    reference_run,
    run_cli,
    tiny_config,
)

from diffusion_jax import checkpointing, parallel, train, training
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.data import FolderSource

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def assert_same_end(workdir, reference) -> None:
    state = load_state(workdir)
    assert int(state["step"]) == 12
    assert_states_equal(state, load_state(reference))
    assert losses(workdir) == losses(reference)  # also: every step logged exactly once


def logged_steps(workdir) -> list[int]:
    return [r["step"] for r in read_metrics(workdir)]


def saving(workdir, min_step: int):
    """True while orbax writes checkpoint >= min_step (its temporary directory exists)."""
    directory = Path(workdir) / "checkpoints"

    def condition():
        if not directory.exists():
            return False
        names = [p.name for p in directory.iterdir()]
        return any(
            n.endswith("orbax-checkpoint-tmp") and int(n.split(".")[0]) >= min_step for n in names
        )

    return condition


# --- SIGKILL -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_async_checkpoint_save_loses_nothing(tmp_path, reference):
    workdir = tmp_path / "run"
    run = Run(workdir, {"training.checkpoint_every": 1})
    run.wait_until(saving(workdir, min_step=3))
    run.kill()
    assert run.proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert any(name.endswith("tmp") for name in left), left  # killed mid-save

    train.train(tiny_config(), workdir)  # the same run, restarted
    assert_same_end(workdir, reference)
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert not (workdir / "checkpoints_unreadable").exists()


@pytest.mark.slow
def test_sigkill_anywhere_then_same_command_reaches_the_same_end(tmp_path, reference):
    """Kill the CLI during a step, a save, preview sampling and start-up; restart each time."""
    workdir = tmp_path / "run"
    command = {"training.checkpoint_every": 2, "training.sample_every": 5}
    kill_points = {
        "during a train step": lambda run: 1 in logged_steps(workdir),
        "during an async checkpoint save": lambda run: saving(workdir, min_step=1)(),
        "during preview sampling": lambda run: "sampling 8 previews" in run.log(),
        "during start-up, after the restore": lambda run: "resumed from step" in run.log(),
    }
    for where, condition in kill_points.items():
        run = Run(workdir, command)
        run.wait_until(lambda run=run, condition=condition: condition(run))
        if where == "during a train step":
            time.sleep(0.05)
        run.kill()
        assert run.proc.returncode == -signal.SIGKILL, where
        if where == "during an async checkpoint save":
            assert [p for p in (workdir / "checkpoints").iterdir() if p.name.endswith("tmp")]
        if where == "during preview sampling":
            sampled = int(re.search(r"sampling 8 previews at step (\d+)", run.log()).group(1))
            assert not (workdir / "samples" / f"step_{sampled:06d}.png").exists()
    final = run_cli(workdir, command)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_end(workdir, reference)
    assert (workdir / "samples" / "step_000010.png").exists()
    assert not (workdir / "checkpoints_unreadable").exists()  # no kill left a broken checkpoint


# --- SIGTERM (preemption) --------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, reference, caplog):
    workdir = tmp_path / "run"
    run = Run(workdir, {"training.num_train_steps": 1000, "training.checkpoint_every": 1000})
    run.wait_until(lambda: 3 in logged_steps(workdir))
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0, run.log()[-3000:]
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", run.log()).group(1))
    assert 3 <= stopped_at < 12
    assert checkpoint_steps(workdir) == [stopped_at] == [logged_steps(workdir)[-1]]

    with caplog.at_level(logging.INFO, logger="absl"):
        train.train(tiny_config(), workdir)  # the restart continues from the saved step
    assert f"resumed from step {stopped_at}" in caplog.text
    assert logged_steps(workdir) == list(range(1, 13))
    assert_same_end(workdir, reference)


# --- Corrupt checkpoints ---------------------------------------------------------------------


def _data_files(step_dir: Path) -> list[Path]:
    """The state's array data files, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# name: (damage done to checkpoint directory d, who notices: orbax itself or our checksum)
CORRUPTIONS = {
    "array bytes flipped": (lambda d: _flip_bytes(_data_files(d)[0]), "checksum"),
    "array file truncated": (lambda d: _truncate(_data_files(d)[0]), "orbax"),
    "array file deleted": (lambda d: _data_files(d)[0].unlink(), "orbax"),
    "array file emptied": (lambda d: _data_files(d)[0].write_bytes(b""), "orbax"),
    "tree metadata garbled": (lambda d: (d / "state" / "_METADATA").write_text("{no"), "orbax"),
    "ocdbt manifest truncated": (lambda d: _truncate(d / "state" / "manifest.ocdbt"), "orbax"),
    "record garbled": (lambda d: (d / "record" / "metadata").write_text("\x00garbage"), "orbax"),
    "state directory deleted": (lambda d: shutil.rmtree(d / "state"), "orbax"),
}


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """Checkpoints 1 and 2 of a small replicated state, and the state."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    state = {
        "params": {f"w{i}": rng.normal(size=(64, 64 + i)).astype(np.float32) for i in range(4)},
        "step": np.int32(2),
    }
    state = jax.tree.map(lambda x: jax.device_put(x, parallel.replicated(mesh)), state)
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    ckpt = checkpointing.Checkpointer(directory, keep=5)
    ckpt.save(1, jax.tree.map(jnp.zeros_like, state))
    ckpt.save(2, state)
    ckpt.close()
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    return directory, state, abstract


# orbax leaves a coroutine or two unawaited when a read fails: noise, not a test failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_detected_and_moved_aside(tmp_path, saved_state, corruption):
    directory, state, abstract = saved_state
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    damage, noticed_by = CORRUPTIONS[corruption]
    damage(copy / "2")
    files_before = sorted(p.relative_to(copy / "2") for p in (copy / "2").rglob("*"))

    ckpt = checkpointing.Checkpointer(copy)
    with pytest.raises(Exception) as info:  # noqa: B017 - orbax and tensorstore raise many types
        ckpt.restore(2, abstract)
    assert isinstance(info.value, checkpointing.CheckpointError) == (noticed_by == "checksum")
    restored, record = ckpt.restore_latest(abstract)
    ckpt.close()

    assert record["step"] == 1
    assert not np.any(jax.device_get(restored["params"]["w0"]))
    assert ckpt.steps() == [1]
    (moved,) = (tmp_path / "checkpoints_unreadable").iterdir()
    assert moved.name.startswith("2-")
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files_before  # kept whole
    gc.collect()  # the unawaited coroutines go now, under this test's warning filter


def test_intact_checkpoint_restores_bit_exact(saved_state):
    directory, state, abstract = saved_state
    ckpt = checkpointing.Checkpointer(directory)
    restored, record = ckpt.restore(2, abstract)
    ckpt.close()
    assert record["state_sha256"] == checkpointing.state_digest(state)
    assert_states_equal(jax.device_get(restored), jax.device_get(state))


def test_run_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(
    tmp_path, reference, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)  # a finished run: checkpoints 8 and 12
    _flip_bytes(_data_files(workdir / "checkpoints" / "12")[0])  # orbax alone would not notice

    with caplog.at_level(logging.INFO, logger="absl"):
        train.train(tiny_config(), workdir)  # the same command again: redo steps 9..12
    assert re.search(r"checkpoint .*/12 cannot be read .*SHA-256", caplog.text)
    assert "resumed from step 8" in caplog.text
    moved = [p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()]
    assert moved == ["12"]
    assert_same_end(workdir, reference)


def test_all_checkpoints_unreadable_is_refused_not_restarted_from_step_0(tmp_path, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (8, 12):
        _flip_bytes(_data_files(workdir / "checkpoints" / str(step))[0])
    for _ in range(2):  # the same command again still refuses: the bad checkpoints are aside
        with pytest.raises(train.UserError, match=r"no checkpoint in .* could be read"):
            train.train(tiny_config(), workdir)
    moved = sorted(p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir())
    assert moved == ["12", "8"]
    assert losses(workdir) == losses(reference)  # metrics.jsonl not rewound to step 0


# --- A config whose state does not fit the checkpoints ------------------------------------------


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_switching_grad_clip_off_is_refused_and_the_checkpoints_stay(tmp_path, reference):
    """grad_clip 1 -> 0 removes optax's clipping state: the CLI names it and exits 2."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)  # trained with grad_clip=1.0
    before = _snapshot(workdir)
    result = run_cli(workdir, {"optim.grad_clip": 0.0}, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "checkpoints/12 holds another state" in errors[0]
    assert "only in the checkpoint: opt_state.1.0.count" in errors[0]
    assert "config.json differs in optim.grad_clip: 1.0 -> 0.0" in errors[0]
    assert "Traceback" not in result.stderr
    assert _snapshot(workdir) == before  # checkpoints, config.json and metrics untouched
    assert not (workdir / "checkpoints_unreadable").exists()


def test_a_model_change_shape_fields_miss_is_refused_and_the_checkpoints_stay(
    tmp_path, reference, monkeypatch
):
    """The checkpoint's own tree is compared, so a field SHAPE_FIELDS does not list (emptied
    here) cannot restart the run either."""
    monkeypatch.setattr(workdir_lib, "SHAPE_FIELDS", ())
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    with pytest.raises(train.UserError) as info:
        train.train(tiny_config({"model.num_res_blocks": 2}), workdir)
    message = str(info.value)
    assert "\n" not in message
    assert "only in this config's state: ema_params.down_blocks_0.resnets_1" in message
    assert "config.json differs in model.num_res_blocks: 1 -> 2" in message
    assert _snapshot(workdir) == before
    assert not (workdir / "checkpoints_unreadable").exists()


# --- NaN / inf ------------------------------------------------------------------------------


@pytest.fixture
def nan_at_step_6(monkeypatch):
    """Make the images of train step 6 NaN (inside the jitted step, as a real blow-up would)."""
    real_make, real_scale = training.make_train_step, training.to_model_range

    def scale(images):  # lets the already-scaled (poisoned) float images through
        return images if jnp.issubdtype(images.dtype, jnp.floating) else real_scale(images)

    def make(*args, **kwargs):
        step = real_make(*args, **kwargs)

        def poisoned(state, batch, key):
            x = jnp.where(state.step + 1 == 6, jnp.nan, real_scale(batch["image"]))
            return step(state, {**batch, "image": x}, key)

        return poisoned

    monkeypatch.setattr(training, "to_model_range", scale)
    monkeypatch.setattr(training, "make_train_step", make)


def test_nan_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_at_step_6):
    workdir = tmp_path / "run"
    with pytest.raises(train.UserError) as info:
        train.train(tiny_config({"training.nan_policy": "stop"}), workdir)
    message = str(info.value)
    assert "non-finite loss or gradient at step 6" in message
    assert "newest checkpoint kept: step 4" in message
    assert checkpoint_steps(workdir) == [4]
    state = load_state(workdir)
    assert int(state["nonfinite_steps"]) == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    last = read_metrics(workdir)[-1]  # metrics.jsonl stays strict JSON: NaN is written as null
    assert last["step"] == 6 and last["loss"] is None and last["nonfinite_steps"] == 1


def test_nan_policy_skip_drops_the_update_and_counts_it(tmp_path, reference, nan_at_step_6):
    workdir = tmp_path / "run"
    train.train(tiny_config({"training.nan_policy": "skip"}), workdir)
    rows = read_metrics(workdir)
    assert [r["nonfinite_steps"] for r in rows] == [0] * 5 + [1] * 7
    assert rows[5]["loss"] is None and rows[5]["grad_norm"] is None
    assert all(r["loss"] is not None for r in rows[6:])
    expected = losses(reference)
    np.testing.assert_allclose([r["loss"] for r in rows[:5]], [expected[s] for s in range(1, 6)])
    state = load_state(workdir)
    assert int(state["step"]) == 12
    assert int(state["nonfinite_steps"]) == 1 and int(state["first_nonfinite_step"]) == 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


# --- Bad image files -------------------------------------------------------------------------


def _image_folder(root: Path) -> dict:
    """Good images in many modes and sizes, and broken files; returns what is expected."""
    root.mkdir()
    rng = np.random.default_rng(0)

    def noise(*shape):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    Image.fromarray(noise(12, 10, 3)).save(root / "rgb_portrait.png")
    Image.fromarray(noise(8, 16, 3)).save(root / "rgb_landscape.jpg", quality=90)
    Image.fromarray(noise(9, 9)).save(root / "gray.png")
    Image.fromarray(noise(9, 9)).convert("I;16").save(root / "gray16.png")
    Image.fromarray(noise(8, 8, 4)).save(root / "rgba.png")
    Image.fromarray(noise(8, 8, 2), mode="LA").save(root / "gray_alpha.png")
    Image.fromarray(noise(8, 8, 3)).convert("P").save(root / "palette.png")
    Image.fromarray(noise(8, 8, 3)).convert("CMYK").save(root / "cmyk.jpg")
    transparent = np.zeros((8, 8, 4), np.uint8)  # fully transparent black: white over white
    Image.fromarray(transparent).save(root / "transparent.png")
    Image.fromarray(noise(32, 32, 3)).save(root / "UPPER.PNG")

    good_png = (root / "rgb_portrait.png").read_bytes()
    (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "random_bytes.png").write_bytes(noise(300).tobytes())
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpeg").write_text("this is not an image")
    bad_crc = bytearray(good_png)
    bad_crc[40] ^= 0xFF  # inside the IHDR/IDAT chunks: the CRC no longer matches
    (root / "bad_crc.png").write_bytes(bytes(bad_crc))
    (root / "notes.txt").write_text("ignored: not an image extension")
    return {"good": 10, "corrupt": 5}


def test_image_folder_skips_and_counts_corrupt_files_and_converts_modes(tmp_path):
    expected = _image_folder(tmp_path / "images")
    for channels in (1, 3):
        source = FolderSource(tmp_path / "images", image_size=8, num_channels=channels)
        assert len(source) == expected["good"]
        assert source.num_skipped == expected["corrupt"]
        assert {Path(f).name for f in source.skipped_files} == {
            "truncated.png",
            "random_bytes.png",
            "empty.jpg",
            "text.jpeg",
            "bad_crc.png",
        }
        for i in range(len(source)):
            image = source[i]["image"]
            assert image.shape == (8, 8, channels) and image.dtype == np.uint8
        names = [Path(f).name for f in source.files]
        assert np.all(source[names.index("transparent.png")]["image"] == 255)


def test_training_on_an_image_folder_with_corrupt_files(tmp_path, caplog):
    _image_folder(tmp_path / "images")
    workdir = tmp_path / "run"
    config = tiny_config(
        {"data.dataset": f"folder:{tmp_path / 'images'}", "training.num_train_steps": 3}
    )
    with caplog.at_level(logging.WARNING):
        metrics = train.train(config, workdir)
    assert "skipped 5 corrupt or unreadable of 15 files" in caplog.text
    assert logged_steps(workdir) == [1, 2, 3]
    assert np.isfinite(metrics["loss"])


# --- Untrusted files -------------------------------------------------------------------------

UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}
UNSAFE_CALLS = ("torch.load", "os.system", "os.popen", "yaml.load", "read_pickle", "jit.load")
# The one documented exception: converting the FID network's TorchScript file from a pinned wheel.
ALLOWED = {("metrics/convert_inception.py", "torch.jit.load")}


def unsafe_uses(source: str, filename: str) -> list[str]:
    """Code (not docstrings or comments) that unpickles, runs a shell, or evals."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        found = []
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found = [node.module] if node.module.split(".")[0] in UNSAFE_MODULES else []
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            found = [name] if name.endswith(UNSAFE_CALLS) or name in ("eval", "exec") else []
            found += [
                f"{name}({k.arg}=True)"
                for k in node.keywords
                if k.arg in ("shell", "allow_pickle")
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
            ]
        hits += [f"{filename}:{node.lineno}: {w}" for w in found if (filename, w) not in ALLOWED]
    return hits


UNSAFE_EXAMPLE = '''
import pickle
from dill import loads
import numpy as np, subprocess, torch, os
np.load("x.npy", allow_pickle=True)
subprocess.run("ls", shell=True)
torch.load("model.pt")
torch.jit.load("model.pt")
os.system("ls")
eval("1")
np.load("x.npz", allow_pickle=False)  # fine
"""no pickle here: a docstring"""
'''


def test_the_unsafe_code_check_catches_what_it_should():
    hits = unsafe_uses(UNSAFE_EXAMPLE, "example.py")
    assert [h.split(": ")[1] for h in hits] == [
        "pickle",
        "dill",
        "np.load(allow_pickle=True)",
        "subprocess.run(shell=True)",
        "torch.load",
        "torch.jit.load",
        "os.system",
        "eval",
    ]
    assert unsafe_uses('torch.jit.load("w.pt")', "metrics/convert_inception.py") == []


def test_no_code_path_deserializes_untrusted_files_unsafely():
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC / "diffusion_jax").as_posix()
        hits += unsafe_uses(path.read_text(), relative)
    assert not hits, "unpickling, shell or eval in src/:\n" + "\n".join(hits)
