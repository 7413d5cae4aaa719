"""The NumPy model of CAME against came-pytorch 0.1.3; it and came() against closed forms."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from golden_data import CASES, RTOL_OF_MOVEMENT, load_case, unstack
from helpers import assert_close_to_movement
from reference_numpy import came_numpy, came_step, init_state
from reference_torch import run_came_pytorch

import came_optax


@pytest.mark.parametrize("case", CASES)
def test_matches_golden(case: str):
    data = load_case(case)
    trajectory = came_numpy(
        data["init"],
        unstack(data["grads"], data["steps"]),
        learning_rate=data["lrs"],
        **data["hparams"],
    )
    actual = {leaf: np.stack([step[leaf] for step in trajectory]) for leaf in data["params"]}
    assert_close_to_movement(actual, data["params"], data["init"], RTOL_OF_MOVEMENT)


@pytest.mark.parametrize("case", CASES)
def test_update_rms_matches_golden(case: str):
    data = load_case(case)
    params = {k: v.astype(np.float64) for k, v in data["init"].items()}
    state = init_state(params)
    for t, grads in enumerate(unstack(data["grads"], data["steps"])):
        params, state, rms = came_step(
            params,
            grads,
            state,
            count=t + 1,
            learning_rate=data["lrs"][t],
            **data["hparams"],
        )
        for leaf, value in rms.items():
            np.testing.assert_allclose(value, data["update_rms"][leaf][t], rtol=1e-5, err_msg=leaf)


def _came_optax(params, grads_per_step, **kwargs):
    """``came_numpy``'s trajectory from ``came_optax.came`` (float32)."""
    tx = came_optax.came(**kwargs)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state, trajectory = tx.init(params), []
    for grads in grads_per_step:
        grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


@pytest.mark.parametrize(
    "run, rtol", [(came_numpy, 1e-9), (_came_optax, 1e-6)], ids=["numpy", "came_optax"]
)
def test_debias_first_step_closed_form(run, rtol):
    # Step 1 with debiasing: an unfactored leaf moves by lr * sign(g); a
    # rank-one factored gradient gives |u| = 1 and r = b1**2, so lr * sign(g) / b1.
    b1, lr = 0.9, 1e-2
    g_vec = np.array([0.3, -2.0, 5.0])
    g_mat = np.outer([1.0, -3.0, 0.5], [2.0, 0.1, -1.0, 4.0])
    params = {"vec": np.zeros(3), "mat": np.zeros((3, 4))}
    (after,) = run(params, [{"vec": g_vec, "mat": g_mat}], learning_rate=lr, b1=b1, debias=True)
    np.testing.assert_allclose(after["vec"], -lr * np.sign(g_vec), rtol=rtol)
    np.testing.assert_allclose(after["mat"], -lr * np.sign(g_mat) / b1, rtol=rtol)


@pytest.mark.parametrize(
    "run, rtol", [(came_numpy, 1e-12), (_came_optax, 1e-6)], ids=["numpy", "came_optax"]
)
def test_debias_is_identity_when_decays_are_zero(run, rtol):
    rng = np.random.default_rng(0)
    params = {"m": rng.normal(size=(3, 4)), "v": rng.normal(size=(5,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
    kwargs = dict(learning_rate=1e-2, b1=0.0, b2=0.0, b3=0.0)
    plain = run(params, grads, **kwargs)
    debiased = run(params, grads, debias=True, **kwargs)
    for a, b in zip(plain, debiased, strict=True):
        for k in params:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol)


LIVE_SHAPES = {"s": (), "v": (6,), "m": (4, 5), "t": (2, 3, 4)}


@pytest.mark.parametrize(
    "learning_rate, hparams",
    [
        (1e-2, {}),
        (
            5e-3,
            {
                "b1": 0.85,
                "b2": 0.95,
                "b3": 0.99,
                "eps1": 1e-24,
                "eps2": 1e-14,
                "clip_threshold": 0.7,
                "weight_decay": 0.05,
            },
        ),
    ],
)
def test_live_against_came_pytorch(learning_rate: float, hparams: dict[str, float]):
    rng = np.random.default_rng(7)
    steps = 10
    # Small weights keep float32 rounding of the reference well under the tolerance.
    init = {
        k: np.asarray(0.1 * rng.normal(size=s), dtype=np.float32) for k, s in LIVE_SHAPES.items()
    }
    grads = [
        {
            k: np.asarray(rng.normal(size=s) * np.exp(rng.normal(size=s)), dtype=np.float32)
            for k, s in LIVE_SHAPES.items()
        }
        for _ in range(steps)
    ]
    stacked = {k: np.stack([g[k] for g in grads]) for k in init}
    expected = run_came_pytorch(init, stacked, learning_rate, **hparams)
    trajectory = came_numpy(init, grads, learning_rate=learning_rate, **hparams)
    actual = {k: np.stack([step[k] for step in trajectory]) for k in init}
    assert_close_to_movement(actual, expected, init, RTOL_OF_MOVEMENT)
