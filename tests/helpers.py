"""What several test files share: exact tree comparisons, training steps, model shapes,
restore targets and fresh processes."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parents[1]


# --- Exact comparisons of pytrees ---------------------------------------------------------------


def assert_bitwise_equal(a, b) -> None:
    """Same tree structure, and every leaf has the same dtype, shape and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        assert x.tobytes() == y.tobytes(), f"{where} differs"


def deviations_from_movement(actual, expected, start) -> dict[str, float]:
    """Per leaf: max |actual - expected| over the max movement of ``expected`` from ``start``.

    Float32 arithmetic in another order moves each value by rounding, which near a
    cancellation can be a large fraction of that value but stays tiny next to how far the
    parameters moved: the measure for "equal to float32 rounding".
    """
    out = {}
    for (path, a), b, p0 in zip(
        jax.tree_util.tree_leaves_with_path(actual),
        jax.tree.leaves(expected),
        jax.tree.leaves(start),
        strict=True,
    ):
        a, b, p0 = (np.asarray(x, np.float64) for x in (a, b, p0))
        if a.size == 0:
            continue
        moved = max(float(np.max(np.abs(b - p0))), 1e-30)
        out[jax.tree_util.keystr(path)] = float(np.max(np.abs(a - b))) / moved
    return out


def assert_close_to_movement(actual, expected, start, tol: float) -> None:
    """Every leaf deviates by at most ``tol`` of its movement (:func:`deviations_from_movement`)."""
    deviations = deviations_from_movement(actual, expected, start)
    worst = max(deviations, key=deviations.get, default=None)
    assert worst is None or deviations[worst] <= tol, (worst, deviations[worst], tol)


def leaf_digests(tree) -> dict[str, str]:
    """SHA-256 of each leaf's bytes, keyed by its key path, dtype and shape."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(x)
        out[f"{jax.tree_util.keystr(path)} {x.dtype} {x.shape}"] = hashlib.sha256(
            x.tobytes()
        ).hexdigest()
    return out


def tree_digest(tree) -> str:
    """One SHA-256 of every leaf's key path, dtype, shape and bytes."""
    return hashlib.sha256(json.dumps(leaf_digests(tree)).encode()).hexdigest()


def assert_finite(**trees) -> None:
    """Every leaf of every tree is finite; a failure names the tree and the leaf."""
    for name, tree in trees.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            assert np.all(np.isfinite(np.asarray(x))), (
                f"{name}{jax.tree_util.keystr(path)} is not finite"
            )


# --- Training and restoring ---------------------------------------------------------------------


def loss_step(tx, loss):
    """A jitted ``step(params, opt_state, *batch)``: one step of ``tx`` on ``loss``."""

    @jax.jit
    def step(params, opt_state, *batch):
        grads = jax.grad(loss)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def restore_target(tree):
    """``ShapeDtypeStruct``\\ s of ``tree`` on this process's first device, to restore into."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# --- Model shapes and state sizes ---------------------------------------------------------------


@functools.cache
def load_module(path: str) -> ModuleType:
    """The Python file at ``path`` (relative to the repository) as a module, loaded once."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models() -> ModuleType:
    """``benchmarks/_models.py``: the parameter shapes the benchmarks and the README use."""
    return load_module("benchmarks/_models.py")


def gpt2_small() -> dict:
    """GPT-2 small (124M, tied embeddings) as float32 ``ShapeDtypeStruct`` leaves."""
    return models().abstract(models().gpt2(768, 12))


def state_bytes(tx, params) -> int:
    """Bytes of ``tx``'s state for ``params``, from shapes alone (nothing is allocated)."""
    state = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def reduced_spec(spec: P, ndim: int, axis: int) -> P:
    """The partition spec of a statistic that averages ``axis`` of a leaf sharded by ``spec``."""
    entries = list(spec) + [None] * (ndim - len(spec))
    del entries[axis]
    return P(*entries)


# --- Fresh processes ----------------------------------------------------------------------------


def python_env(*, devices: int | None = None, xla_flags: Sequence[str] = ()) -> dict[str, str]:
    """This environment, with the repository and ``tests/`` importable.

    ``devices`` simulates that many CPU devices (and selects the CPU platform).
    """
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", ""), *xla_flags]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def run_python(
    args: Sequence[str],
    *,
    devices: int | None = None,
    xla_flags: Sequence[str] = (),
    timeout: float,
) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process from the repository root (see :func:`python_env`)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=python_env(devices=devices, xla_flags=xla_flags),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
