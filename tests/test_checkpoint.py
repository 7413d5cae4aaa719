"""Orbax checkpoints of CAME's state: resumed training equals uninterrupted training bit for bit.

The restore target is built from ``jax.eval_shape(tx.init, params)``, as a fresh process
resuming a run would build it: no live optimizer state is needed. The sharded variant runs
``tests/_checkpoint_sharded_worker.py`` in two subprocesses on 8 simulated CPU devices, one
saving and one resuming, so this process keeps its single device.
"""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, assert_bitwise_equal, loss_step, restore_target, run_python

import came_optax

ocp = pytest.importorskip("orbax.checkpoint")

TOTAL_STEPS, SAVE_EVERY, CRASH_AFTER = 10, 3, 7  # the run dies after step 7 ...
LAST_SAVED = CRASH_AFTER // SAVE_EVERY * SAVE_EVERY  # ... and resumes from step 6


def _init_params() -> dict:
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.standard_normal((12, 8)) / 4, jnp.float32),
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((8, 6)) / 3, jnp.bfloat16),
            "bias": jnp.zeros(6, jnp.float32),
        },
        "conv": jnp.asarray(rng.standard_normal((2, 3, 4)) / 2, jnp.float32),
        "scale": jnp.ones((), jnp.float32),
    }
    # Committed like restored arrays, so that one compilation serves both runs.
    return jax.device_put(params, jax.devices()[0])


def _batch(step: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(100 + step)
    x = jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)
    return x, jnp.asarray(np.sin(np.arange(16 * 6).reshape(16, 6) + step), jnp.float32)


def _loss(params, x, y):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    hidden = jnp.tanh(x @ p["embed"])
    pred = p["scale"] * (hidden @ p["dense"]["kernel"] + p["dense"]["bias"])
    return jnp.mean((pred - y) ** 2) + 1e-2 * jnp.mean(jnp.square(p["conv"]))


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


OPTIMIZERS = {
    "came": lambda: came_optax.came(1e-2),
    # A schedule, injected hyperparameters, bfloat16 momentum, bias correction, a mask and
    # a non-finite guard: every kind of state a real run carries.
    "wrapped": lambda: optax.apply_if_finite(
        optax.inject_hyperparams(came_optax.came, static_args=("mask", "debias"))(
            learning_rate=optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, TOTAL_STEPS),
            weight_decay=0.1,
            mask=_decay_mask,
            mu_dtype="bfloat16",
            debias=True,
        ),
        max_consecutive_errors=5,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_the_latest_checkpoint_is_bit_for_bit(name, tmp_path):
    tx = OPTIMIZERS[name]()
    step = loss_step(tx, _loss)

    params = _init_params()
    opt_state = jax.device_put(tx.init(params), jax.devices()[0])
    for t in range(TOTAL_STEPS):
        params, opt_state = step(params, opt_state, *_batch(t))
    uninterrupted = {"params": params, "opt_state": opt_state}

    options = ocp.CheckpointManagerOptions(save_interval_steps=SAVE_EVERY, max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        params = _init_params()
        opt_state = jax.device_put(tx.init(params), jax.devices()[0])
        for t in range(CRASH_AFTER):
            params, opt_state = step(params, opt_state, *_batch(t))
            manager.save(
                t + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state})
            )
            if t + 1 == LAST_SAVED:
                saved = {"params": params, "opt_state": opt_state}
    del params, opt_state

    # A fresh process knows only the parameters' shapes and the optimizer.
    target = restore_target(
        {"params": _init_params(), "opt_state": jax.eval_shape(tx.init, _init_params())}
    )
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
    assert start == LAST_SAVED
    assert_bitwise_equal(restored, saved)

    params, opt_state = restored["params"], restored["opt_state"]
    for t in range(start, TOTAL_STEPS):
        params, opt_state = step(params, opt_state, *_batch(t))
    assert_bitwise_equal({"params": params, "opt_state": opt_state}, uninterrupted)


def test_restored_state_keeps_its_types_and_dtypes(tmp_path):
    tx = OPTIMIZERS["wrapped"]()
    params = _init_params()
    opt_state = loss_step(tx, _loss)(params, tx.init(params), *_batch(0))[1]
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", opt_state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            tmp_path / "state", restore_target(jax.eval_shape(tx.init, params))
        )
    came = restored.inner_state.inner_state[0]
    assert isinstance(came, came_optax.ScaleByCameState)
    assert came.mu["embed"].dtype == jnp.bfloat16
    assert came.count.dtype == jnp.int32 and int(came.count) == 1
    chex.assert_trees_all_equal_shapes_and_dtypes(came, opt_state.inner_state.inner_state[0])
    assert_bitwise_equal(restored, opt_state)


def _run_worker(mode: str, directory: Path) -> dict:
    worker = REPO / "tests" / "_checkpoint_sharded_worker.py"
    result = run_python([str(worker), mode, str(directory)], devices=8, timeout=300)
    assert result.returncode == 0, f"{mode} worker failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_state_resumes_bit_for_bit_in_a_new_process(tmp_path):
    saved = _run_worker("save", tmp_path)
    resumed = _run_worker("resume", tmp_path)
    assert saved["devices"] == resumed["devices"] == 8
    # The state is genuinely sharded: the momentum and statistics are split over the mesh.
    assert saved["sharded_state_leaves"] >= 4
    assert resumed["restored_shardings_match"]
    assert resumed["digests"] == saved["digests"]
