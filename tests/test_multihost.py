"""Two processes joined over 127.0.0.1 train like one process with two devices.

Process i of 2 runs the train CLI with config.distributed.* set and one CPU device; together
they form the same 2-device mesh, global batch and program as one process with 2 emulated
devices. Every run has an outer timeout and both processes are killed on failure.
"""

import signal
import subprocess

import jax
import numpy as np
import portpicker
import pytest
from train_harness import Run, checkpoint_steps, cli_env, load_state, read_metrics, run_cli

pytestmark = pytest.mark.slow

# The two devices' partial sums meet in one all-reduce: XLA's in-process one, or gloo's across
# processes. With two addends the order cannot matter, and losses and states come out
# bit-identical here; the tolerance leaves room for a float32 reduction in another order (more
# processes, another collective library), a few ulps per step over 6 Adam steps.
RTOL = 1e-5


def start_pair(workdir, overrides: dict, *, heartbeat_timeout: int = 100) -> list[Run]:
    port = portpicker.pick_unused_port()
    runs = []
    for process_id in range(2):
        flags = {
            **overrides,
            "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2,
            "distributed.process_id": process_id,
            "distributed.initialization_timeout": 120,
            "distributed.heartbeat_timeout": heartbeat_timeout,
        }
        runs.append(Run(workdir, flags, env=cli_env(num_devices=1)))
    return runs


def finish_pair(runs: list[Run], timeout: float = 500) -> None:
    try:
        codes = [run.wait(timeout) for run in runs]
    finally:
        for run in runs:
            run.kill()
    logs = "\n\n".join(f"--- process {i}:\n{r.log()[-3000:]}" for i, r in enumerate(runs))
    assert codes == [0, 0], logs


def test_two_processes_match_one_process_with_two_devices_and_resume(tmp_path):
    one = tmp_path / "one_process"
    result = run_cli(one, {"training.num_train_steps": 6}, env=cli_env(num_devices=2))
    assert result.returncode == 0, result.stderr[-3000:]

    two = tmp_path / "two_processes"
    runs = start_pair(two, {"training.num_train_steps": 4})
    finish_pair(runs)
    assert checkpoint_steps(two) == [4]
    runs = start_pair(two, {"training.num_train_steps": 6})  # both restart: a resume
    finish_pair(runs)
    for run in runs:
        assert "resumed from step 4" in run.log()
    assert "process 1 of 2" in runs[1].log()

    expected, actual = read_metrics(one), read_metrics(two)  # process 0 writes the metrics
    assert [r["step"] for r in actual] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in actual], [r["loss"] for r in expected], rtol=RTOL, atol=0
    )
    np.testing.assert_allclose(_flat(load_state(two)), _flat(load_state(one)), rtol=RTOL, atol=1e-7)


def _flat(state) -> np.ndarray:
    return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(state)])


@pytest.mark.parametrize(
    "victim, fault",
    [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["worker killed", "coordinator killed", "worker hangs"],
)
def test_when_one_process_dies_the_other_exits_with_a_clear_error(tmp_path, victim, fault):
    """No process waits forever on a lost peer: it exits within heartbeat_timeout (here 5 s)."""
    workdir = tmp_path / "run"
    runs = start_pair(
        workdir,
        {"training.num_train_steps": 100_000, "training.checkpoint_every": 100_000},
        heartbeat_timeout=5,
    )
    survivor = runs[1 - victim]
    try:
        runs[0].wait_until(lambda: len(read_metrics(workdir)) >= 2)
        runs[victim].proc.send_signal(fault)
        try:
            code = survivor.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process still runs 120 s after its peer was lost")
    finally:
        for run in runs:
            run.kill()
    log = survivor.log()
    assert code != 0
    clear = (
        "another process died or hangs",  # train.py, when a collective fails
        "JAX distributed service detected fatal errors",  # JAX, after the heartbeat timeout
    )
    assert any(phrase in log for phrase in clear), log[-3000:]
