"""came() reproduces came-pytorch 0.1.3 (golden trajectories and, when installed, live)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from golden_data import CASES, RTOL_OF_MOVEMENT, load_case
from helpers import assert_close_to_movement
from reference_numpy import came_numpy
from reference_torch import run_came_pytorch

import came_optax

# The schedule the golden ``schedule`` case was recorded with (see make_golden.py).
GOLDEN_SCHEDULE = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1e-2, warmup_steps=8, decay_steps=32, end_value=1e-3
)


def _trajectory(tx, init, grads, steps):
    """Params after every step, as float32 NumPy arrays of shape [steps, *leaf]."""

    def body(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    params = jax.tree.map(jnp.asarray, init)
    _, history = jax.jit(lambda p, g: jax.lax.scan(body, (p, tx.init(p)), g))(params, grads)
    assert jax.tree.leaves(history)[0].shape[0] == steps
    return jax.tree.map(np.asarray, history)


@pytest.mark.parametrize("case", CASES)
def test_matches_golden_trajectory(case):
    data = load_case(case)
    lr = data["learning_rate"] if data["learning_rate"] is not None else GOLDEN_SCHEDULE
    tx = came_optax.came(lr, **data["hparams"])
    history = _trajectory(tx, data["init"], data["grads"], data["steps"])
    assert_close_to_movement(history, data["params"], data["init"], RTOL_OF_MOVEMENT)


def _random_problem(seed, shapes, steps):
    rng = np.random.default_rng(seed)
    init = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    scale = {k: np.exp(rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    grads = {
        k: (scale[k] * rng.normal(size=(steps, *s))).astype(np.float32) for k, s in shapes.items()
    }
    return init, grads


SHAPES = {"s": (), "v": (6,), "m": (4, 5), "t": (2, 3, 4), "r": (1, 7), "c": (5, 1)}


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"weight_decay": 0.2, "clip_threshold": 0.3},
        {"b1": 0.5, "b2": 0.9, "b3": 0.99, "clip_threshold": None},
    ],
)
def test_matches_float64_numpy_transcription(hparams, debias):
    steps, lr = 12, 3e-3
    init, grads = _random_problem(1, SHAPES, steps)
    tx = came_optax.came(lr, debias=debias, **hparams)
    history = _trajectory(tx, init, grads, steps)
    per_step = [{k: g[t] for k, g in grads.items()} for t in range(steps)]
    expected = came_numpy(init, per_step, learning_rate=lr, debias=debias, **hparams)
    want = {leaf: np.stack([p[leaf] for p in expected]) for leaf in SHAPES}
    assert_close_to_movement(history, want, init, tol=1e-5)


@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"weight_decay": 0.1},
        {"b1": 0.8, "b2": 0.99, "b3": 0.999, "eps1": 1e-20, "eps2": 1e-12, "clip_threshold": 0.5},
    ],
)
def test_matches_installed_came_pytorch(hparams):
    steps, lr = 30, 1e-2
    shapes = {**SHAPES, "k": (2, 3, 4, 5)}
    init, grads = _random_problem(2, shapes, steps)
    expected = run_came_pytorch(init, grads, lr, **hparams)
    history = _trajectory(came_optax.came(lr, **hparams), init, grads, steps)
    assert_close_to_movement(history, expected, init, tol=1e-5)


def test_bf16_params_follow_the_reference_closely():
    """bf16 params: float32 math as in the reference, differing only in bf16 rounding.

    The reference adds its float32 update into the bf16 weight (one rounding); optax
    hands back a bf16 update that ``apply_updates`` adds (two roundings).
    """
    steps, lr = 10, 1e-2
    shapes = {"v": (16,), "m": (16, 8)}
    init, grads = _random_problem(3, shapes, steps)
    init16 = {k: v.astype(jnp.bfloat16) for k, v in init.items()}
    grads16 = {k: g.astype(jnp.bfloat16) for k, g in grads.items()}
    expected = run_came_pytorch(init16, grads16, lr, dtype="bfloat16")
    history = _trajectory(came_optax.came(lr), init16, grads16, steps)
    assert_close_to_movement(history, expected, init16, tol=0.02)
