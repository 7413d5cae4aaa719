"""A process killed while saving a checkpoint leaves the previous one to resume from.

orbax writes a step into a temporary directory and renames it to the step's name once every
array and its metadata are written: the rename is the commit. That is checked here, not assumed.
A fresh process (this file run as a script) trains, saves step ``SAVED`` with a
``CheckpointManager``, trains on and starts saving step ``KILLED``; a temporary-path class (the
manager's public ``temporary_path_class`` option) stops that save at a chosen point and says
so, and this process then kills it with SIGKILL. The two points bracket every partial write:
right after the temporary directory is created (no array written yet) and after every array is
written with the commit still to come. The step being saved must then be invisible, and the run
must resume from ``SAVED`` exactly as if it had never been interrupted.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, assert_bitwise_equal, loss_step, python_env, restore_target

import came_optax

ocp = pytest.importorskip("orbax.checkpoint")

SAVED, KILLED, TOTAL_STEPS = 3, 5, 7
POINTS = ("after the temporary directory is created", "before the commit")


def _params() -> dict:
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.standard_normal((12, 8)) / 3,
        "bias": np.zeros(8),
        "conv": rng.standard_normal((3, 4, 8)) / 2,
        "scale": np.ones(()),
    }
    return jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))


def _loss(params, x, y):
    pred = params["scale"] * (jnp.tanh(x @ params["kernel"]) + params["bias"])
    return jnp.mean((pred - y) ** 2) + 1e-2 * jnp.mean(jnp.square(params["conv"]))


def _batch(step: int):
    rng = np.random.default_rng(100 + step)
    x = jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)
    return x, jnp.asarray(np.cos(np.arange(16 * 8).reshape(16, 8) + step), jnp.float32)


TX = optax.inject_hyperparams(came_optax.came)(learning_rate=1e-2, weight_decay=0.1)


_step = loss_step(TX, _loss)


def _train(params, opt_state, steps):
    for t in steps:
        params, opt_state = _step(params, opt_state, *_batch(t))
    return {"params": params, "opt_state": opt_state}


def _stopping_path_class(point: str):
    """An AtomicRenameTemporaryPath that stops step KILLED's save at ``point`` and says so."""
    base = ocp.path.atomicity.AtomicRenameTemporaryPath

    def stop(path) -> None:
        if path.get_final().name == str(KILLED):
            print(f"stopped {point}", flush=True)
            time.sleep(600)

    class Stopping(base):
        async def create(self, *args, **kwargs):
            created = await super().create(*args, **kwargs)
            if point == POINTS[0]:
                stop(self)
            return created

        async def finalize(self, *args, **kwargs):
            if point == POINTS[1]:
                stop(self)
            return await super().finalize(*args, **kwargs)

    return Stopping


def run_until_killed(directory: Path, point: str) -> None:
    options = ocp.CheckpointManagerOptions(temporary_path_class=_stopping_path_class(point))
    manager = ocp.CheckpointManager(directory, options=options)
    state = _train(_params(), TX.init(_params()), range(SAVED))
    manager.save(SAVED, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    state = _train(state["params"], state["opt_state"], range(SAVED, KILLED))
    manager.save(KILLED, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _kill_when_stopped(directory: Path, point: str, timeout: float = 180.0) -> None:
    """Runs :func:`run_until_killed` in a fresh process; SIGKILLs it once its save stops."""
    log = directory.parent / "child.log"  # a file, so that a chatty child never blocks on a pipe
    with open(log, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, __file__, str(directory), point],
            cwd=REPO,
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        deadline, line = time.monotonic() + timeout, ""
        try:
            while not line.startswith("stopped") and time.monotonic() < deadline:
                ready, _, _ = select.select([child.stdout], [], [], deadline - time.monotonic())
                line = child.stdout.readline() if ready else ""
                if ready and not line:
                    break  # the child exited
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
    assert line.strip() == f"stopped {point}", log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_save_killed_midway_leaves_previous_checkpoint_to_resume_from(point, tmp_path):
    directory = tmp_path / "run"
    _kill_when_stopped(directory, point)

    # The killed save left its temporary directory and nothing under the step's name.
    names = sorted(p.name for p in directory.iterdir())
    assert str(SAVED) in names and str(KILLED) not in names, names
    (partial,) = [directory / n for n in names if n.startswith(f"{KILLED}.") and "tmp" in n]
    # Stopped where it was meant to: before any array, or with all of them written.
    written = [p.name for p in partial.rglob("*") if p.name in ("_METADATA", "manifest.ocdbt")]
    assert bool(written) == (point == POINTS[1]), written

    with ocp.CheckpointManager(directory) as manager:
        assert manager.all_steps() == [SAVED]
        assert manager.latest_step() == SAVED
        opt_state = jax.eval_shape(TX.init, _params())
        target = restore_target({"params": _params(), "opt_state": opt_state})
        restored = manager.restore(SAVED, args=ocp.args.StandardRestore(target))

    uninterrupted_at_saved = _train(_params(), TX.init(_params()), range(SAVED))
    assert_bitwise_equal(restored, uninterrupted_at_saved)
    resumed = _train(restored["params"], restored["opt_state"], range(SAVED, TOTAL_STEPS))
    uninterrupted = _train(
        uninterrupted_at_saved["params"],
        uninterrupted_at_saved["opt_state"],
        range(SAVED, TOTAL_STEPS),
    )
    assert_bitwise_equal(resumed, uninterrupted)

    # The run saves the step it lost again, past the leftover temporary directory.
    state = _train(restored["params"], restored["opt_state"], range(SAVED, KILLED))
    with ocp.CheckpointManager(directory) as manager:
        manager.save(KILLED, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        assert manager.latest_step() == KILLED
        assert_bitwise_equal(
            manager.restore(KILLED, args=ocp.args.StandardRestore(restore_target(state))),
            state,
        )


if __name__ == "__main__":
    run_until_killed(Path(sys.argv[1]), sys.argv[2])
