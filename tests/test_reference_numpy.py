"""Checks the NumPy model of CAME against came-pytorch 0.1.3 trajectories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_data import (
    CASES,
    GOLDEN,
    RTOL_OF_MOVEMENT,
    load_case,
    relative_deviation,
    unstack,
)
from reference_numpy import came_numpy, came_step, init_state
from reference_torch import run_came_pytorch


def test_golden_file_is_small_and_complete():
    assert GOLDEN.stat().st_size < 1.5e6
    with np.load(GOLDEN) as z:
        meta = json.loads(z["meta"][()])
        assert meta["cases"] == CASES
        assert meta["steps"] >= 30
        for case in CASES:
            for leaf, shape in meta["leaves"].items():
                assert z[f"{case}/{leaf}/init"].shape == tuple(shape)
                assert z[f"{case}/{leaf}/grads"].dtype == np.float32
                assert z[f"{case}/{leaf}/grads"].shape == (meta["steps"], *shape)
                assert z[f"{case}/{leaf}/params"].shape == (meta["steps"], *shape)


@pytest.mark.parametrize("case", CASES)
def test_matches_golden(case: str):
    data = load_case(case)
    trajectory = came_numpy(
        data["init"],
        unstack(data["grads"], data["steps"]),
        learning_rate=data["lrs"],
        **data["hparams"],
    )
    for leaf, expected in data["params"].items():
        actual = np.stack([step[leaf] for step in trajectory])
        dev = relative_deviation(data["init"][leaf], expected, actual)
        assert dev <= RTOL_OF_MOVEMENT, (leaf, dev)


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


def test_constant_cases_store_their_learning_rate():
    for case in CASES:
        data = load_case(case)
        if data["learning_rate"] is not None:
            np.testing.assert_array_equal(data["lrs"], data["learning_rate"])


def test_no_clip_large_clips_on_most_but_not_all_steps():
    data = load_case("no_clip_large")
    threshold = data["hparams"]["clip_threshold"]
    rms = np.stack(list(data["update_rms"].values()))
    active = np.mean(rms > threshold)
    assert 0.5 <= active < 1.0, active


def test_schedule_case_matches_optax_schedule():
    optax = pytest.importorskip("optax")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1e-2,
        warmup_steps=8,
        decay_steps=32,
        end_value=1e-3,
    )
    lrs = load_case("schedule")["lrs"]
    got = np.array([schedule(t) for t in range(len(lrs))], dtype=np.float32)
    # optax's float32 cosine may differ from the stored values by a few ulps.
    np.testing.assert_allclose(got, lrs.astype(np.float32), rtol=1e-6, atol=0)


def test_debias_first_step_closed_form():
    # Step 1 with debiasing: an unfactored leaf moves by lr * sign(g); a
    # rank-one factored gradient gives |u| = 1 and r = b1**2, so lr * sign(g) / b1.
    b1, lr = 0.9, 1e-2
    g_vec = np.array([0.3, -2.0, 5.0])
    g_mat = np.outer([1.0, -3.0, 0.5], [2.0, 0.1, -1.0, 4.0])
    params = {"vec": np.zeros(3), "mat": np.zeros((3, 4))}
    (after,) = came_numpy(
        params, [{"vec": g_vec, "mat": g_mat}], learning_rate=lr, b1=b1, debias=True
    )
    np.testing.assert_allclose(after["vec"], -lr * np.sign(g_vec), rtol=1e-12)
    np.testing.assert_allclose(after["mat"], -lr * np.sign(g_mat) / b1, rtol=1e-9)


def test_debias_is_identity_when_decays_are_zero():
    rng = np.random.default_rng(0)
    params = {"m": rng.normal(size=(3, 4)), "v": rng.normal(size=(5,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
    kwargs = dict(learning_rate=1e-2, b1=0.0, b2=0.0, b3=0.0)
    plain = came_numpy(params, grads, **kwargs)
    debiased = came_numpy(params, grads, debias=True, **kwargs)
    for a, b in zip(plain, debiased, strict=True):
        for k in params:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12)


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
    for k in init:
        actual = np.stack([step[k] for step in trajectory])
        dev = relative_deviation(init[k], expected[k], actual)
        assert dev <= RTOL_OF_MOVEMENT, (k, dev)
