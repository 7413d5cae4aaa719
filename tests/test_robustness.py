"""Bad steps and extreme inputs: CAME either trains on or leaves everything untouched.

* Non-finite gradients: bare ``came()`` lets a NaN or Inf into its state for good,
  as came-pytorch does; wrapped in ``optax.apply_if_finite`` a bad step leaves the
  parameters and CAME's state bit-identical and training continues as if the step
  had never happened.
* Extreme but finite inputs (gradient scales from 1e-30 to 1e36, all-zero gradients,
  size-0 and size-1 axes, scalars, very wide and very tall matrices, bfloat16 and
  float16 parameters for 1000 steps) keep the state and updates finite. came-pytorch's sums
  of squares overflow from about |g| = 1e19 / sqrt(n); came()'s do not (see
  :func:`came_optax.scale_by_factored_second_moment`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_numpy
from helpers import assert_bitwise_equal, assert_close_to_movement, assert_finite

import came_optax

LR = 1e-2


def _gradients(shapes: dict, steps: int, scale: float = 1.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]


def _params(shapes: dict, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _make_step(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def _run(tx, params, grads_seq, step=None):
    """Applies ``grads_seq`` one jitted step at a time; returns params, state, last updates."""
    step = step or _make_step(tx)
    state = tx.init(params)
    updates = None
    for grads in grads_seq:
        params, state, updates = step(params, state, grads)
    return params, state, updates


SHAPES = {"w": (5, 4), "b": (4,), "s": ()}
# Module-level optimizers and jitted steps: tests with equal shapes share one compilation.
CAME = came_optax.came(LR)
CAME_STEP = _make_step(CAME)


# --- Non-finite gradients -------------------------------------------------------------------


def _poisoned(grads: dict, leaf: str, bad: float) -> dict:
    grads = dict(grads)
    g = np.array(grads[leaf])
    g.reshape(-1)[0] = bad
    grads[leaf] = g
    return grads


GUARDED = optax.apply_if_finite(came_optax.came(LR, weight_decay=0.1), max_consecutive_errors=3)
GUARDED_STEP = _make_step(GUARDED)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("leaf", ["w", "b", "s"])
def test_apply_if_finite_skips_a_bad_step_bit_for_bit(bad, leaf):
    tx, step = GUARDED, GUARDED_STEP
    g0, g1, g2 = _gradients(SHAPES, 3)
    params = _params(SHAPES)

    params, state, _ = step(params, tx.init(params), g0)
    before_params, before_inner = params, state.inner_state
    params, state, updates = step(params, state, _poisoned(g1, leaf, bad))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    assert_bitwise_equal(params, before_params)
    assert_bitwise_equal(state.inner_state, before_inner)
    assert int(state.total_notfinite) == 1 and not bool(state.last_finite)

    # Training continues exactly as if the bad step had never been taken.
    for g in (g1, g2):
        params, state, _ = step(params, state, g)
    clean_params, clean_state, _ = _run(tx, _params(SHAPES), [g0, g1, g2], step)
    assert_bitwise_equal(params, clean_params)
    assert_bitwise_equal(state.inner_state, clean_state.inner_state)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


def test_apply_if_finite_does_not_change_finite_steps():
    grads_seq = _gradients(SHAPES, 4)
    guarded, _, _ = _run(optax.apply_if_finite(CAME, 2), _params(SHAPES), grads_seq)
    bare, _, _ = _run(CAME, _params(SHAPES), grads_seq, CAME_STEP)
    for k in SHAPES:
        np.testing.assert_allclose(guarded[k], bare[k], rtol=1e-6, atol=0)


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
    # optax's policy: the (max_consecutive_errors + 1)-th bad step in a row is applied.
    tx = optax.apply_if_finite(came_optax.came(LR), max_consecutive_errors=2)
    g0, g1 = _gradients(SHAPES, 2)
    nan_grads = _poisoned(g1, "w", np.nan)
    step = _make_step(tx)
    params = _params(SHAPES)
    params, state, _ = step(params, tx.init(params), g0)
    for _ in range(2):
        params, state, _ = step(params, state, nan_grads)
        assert_finite(params=params, state=state.inner_state)
    params, state, _ = step(params, state, nan_grads)
    assert not np.isfinite(np.asarray(params["w"])).all()
    assert int(state.total_notfinite) == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_without_a_guard_one_bad_gradient_poisons_its_leaf_for_good(bad):
    # The reference's behaviour: the bad value enters the EMAs and never decays away.
    # Other leaves are unaffected (CAME's statistics are per leaf).
    g = _gradients(SHAPES, 6)
    g[1] = _poisoned(g[1], "w", bad)
    step = CAME_STEP
    params = _params(SHAPES)
    state = CAME.init(params)
    for t, grads in enumerate(g):
        params, state, updates = step(params, state, grads)
        if t >= 1:
            assert np.isnan(np.asarray(updates["w"])).all()
            assert np.isfinite(np.asarray(updates["b"])).all()
    # A NaN enters every statistic; an Inf saturates the second moment but not the rest.
    assert np.isnan(np.asarray(state[0].mu["w"])).any()
    assert np.isnan(np.asarray(state[0].r_row["w"])).any()
    with np.errstate(invalid="ignore", divide="ignore"):
        numpy_params = reference_numpy.came_numpy(
            {k: np.asarray(v) for k, v in _params(SHAPES).items()}, g, learning_rate=LR
        )[-1]
    assert np.isnan(numpy_params["w"]).all() and np.isfinite(numpy_params["b"]).all()


# --- Extreme but finite inputs --------------------------------------------------------------

# One leaf per shape: CAME's statistics are per leaf, so one tree tests every shape at once.
EXTREME_SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 4), "rank3": (2, 3, 4)}


# float32 holds g**2 only for |g| < 1.8e19 and a sum of n squares only below 1.8e19 / sqrt(n);
# came()'s means saturate where their sums overflow, so any finite gradient keeps the state
# finite (came-pytorch 0.1.3 turns such steps into NaN).
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-10, 1e10, 1e15, 1e20, 1e30, 1e36])
def test_extreme_gradient_scales_keep_state_and_updates_finite(scale):
    grads_seq = _gradients(EXTREME_SHAPES, 5, scale=scale)
    params, state, updates = _run(CAME, _params(EXTREME_SHAPES), grads_seq, CAME_STEP)
    assert_finite(updates=updates, state=state, params=params)


@pytest.mark.parametrize("scale", [1e17, 1e19, 1e25])
def test_huge_gradients_of_a_large_leaf_keep_state_and_updates_finite(scale):
    # 4096 x 64 entries: the sums of squares overflow from |g| of about 3e16.
    shapes = {"wide": (4096, 64), "long": (262144,)}
    grads_seq = _gradients(shapes, 3, scale=scale)
    params, state, updates = _run(CAME, _params(shapes), grads_seq)
    assert_finite(updates=updates, state=state, params=params)


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e5, 1e15])
def test_updates_do_not_depend_on_the_gradient_scale(scale):
    # u = g / sqrt(EMA(g**2 + eps1)) is scale-free while g**2 >> eps1 and g**2 is finite.
    grads_seq = _gradients(EXTREME_SHAPES, 5)
    scaled_seq = [jax.tree.map(lambda g: np.float32(scale) * g, gs) for gs in grads_seq]
    _, _, expected = _run(CAME, _params(EXTREME_SHAPES), grads_seq, CAME_STEP)
    _, _, updates = _run(CAME, _params(EXTREME_SHAPES), scaled_seq, CAME_STEP)
    for k in EXTREME_SHAPES:
        atol = 1e-5 * np.max(np.abs(expected[k]))  # for entries where the momentum cancels
        np.testing.assert_allclose(updates[k], expected[k], rtol=2e-5, atol=atol, err_msg=k)


ZERO_SHAPES = {**EXTREME_SHAPES, "empty": (0, 3), "one": (1, 1)}


@jax.jit
def _zero_steps_then_one(params):
    tx = came_optax.came(LR)

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        max_abs = jax.tree.map(lambda u: jnp.max(jnp.abs(u), initial=0.0), updates)
        return (optax.apply_updates(p, updates), s), max_abs

    (params, state), max_zero_updates = jax.lax.scan(body, (params, tx.init(params)), length=500)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    fresh_updates, _ = tx.update(grads, tx.init(params), params)
    return max_zero_updates, updates, fresh_updates, state


def test_many_all_zero_gradients_leave_no_trace():
    max_zero_updates, updates, fresh_updates, state = _zero_steps_then_one(_params(ZERO_SHAPES))
    assert_finite(updates=updates, state=state)
    for k in ZERO_SHAPES:
        assert not np.any(np.asarray(max_zero_updates[k])), k
        # The statistics decayed towards eps1 and eps2 only: the next real gradient moves
        # the parameters exactly as a first step would.
        np.testing.assert_allclose(updates[k], fresh_updates[k], rtol=1e-5, atol=0, err_msg=k)


def test_zero_rows_and_columns_in_a_matrix_stay_finite():
    # Unused embedding rows and dead units give whole zero rows or columns.
    grads_seq = _gradients({"p": (6, 5)}, 5)
    for g in grads_seq:
        g["p"][2, :] = 0.0
        g["p"][:, 3] = 0.0
    _, state, updates = _run(CAME, _params({"p": (6, 5)}), grads_seq, CAME_STEP)
    assert_finite(updates=updates, state=state)
    assert not np.any(np.asarray(updates["p"])[2, :])
    assert not np.any(np.asarray(updates["p"])[:, 3])


DEGENERATE_SHAPES = {
    "scalar": (),
    "empty": (0,),
    "empty_rows": (0, 3),
    "empty_cols": (3, 0),
    "empty_middle": (2, 0, 4),
    "one": (1,),
    "one_by_one": (1, 1),
    "one_row": (1, 7),
    "one_col": (7, 1),
    "one_middle": (3, 1, 5),
}
WIDE_AND_TALL = [(1, 65536), (65536, 1), (2, 32768), (32768, 2)]


def _check_against_reference(shapes: dict, steps: int = 3) -> None:
    grads_seq = _gradients(shapes, steps)
    params0 = _params(shapes)
    params, state, updates = _run(came_optax.came(LR, weight_decay=0.1), params0, grads_seq)
    assert_finite(updates=updates, state=state)
    nonempty = [k for k, shape in shapes.items() if 0 not in shape]
    expected = reference_numpy.came_numpy(
        {k: np.asarray(params0[k]) for k in nonempty},
        [{k: g[k] for k in nonempty} for g in grads_seq],
        learning_rate=LR,
        weight_decay=0.1,
    )[-1]
    for k, shape in shapes.items():
        assert params[k].shape == updates[k].shape == shape, k
    # The reference's parity bound: float32 rounding, within 1e-4 of the movement.
    assert_close_to_movement(
        {k: params[k] for k in nonempty},
        {k: expected[k] for k in nonempty},
        {k: params0[k] for k in nonempty},
        tol=1e-4,
    )


def test_size_zero_and_size_one_axes_and_scalars_match_the_reference():
    _check_against_reference(DEGENERATE_SHAPES)


@pytest.mark.parametrize("shape", WIDE_AND_TALL, ids=str)
def test_very_wide_and_very_tall_matrices_match_the_reference(shape):
    _check_against_reference({"p": shape})


def _mlp_loss(params, x, y):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    hidden = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)


def _train_mlp(dtype, mu_dtype, steps):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
    y = jnp.sin(x @ jnp.asarray(rng.standard_normal(8), jnp.float32))[:, None]
    params = {
        "w1": jnp.asarray(rng.standard_normal((8, 32)) / np.sqrt(8), dtype),
        "b1": jnp.zeros(32, dtype),
        "w2": jnp.asarray(rng.standard_normal((32, 1)) / np.sqrt(32), dtype),
        "b2": jnp.zeros(1, dtype),
    }
    tx = came_optax.came(LR, mu_dtype=mu_dtype)

    @jax.jit
    def train(params):
        def body(carry, _):
            p, s = carry
            loss, grads = jax.value_and_grad(_mlp_loss)(p, x, y)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        return jax.lax.scan(body, (params, tx.init(params)), length=steps)

    return train(params)


@pytest.mark.parametrize(
    "dtype, mu_dtype",
    [(jnp.bfloat16, None), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, None)],
    ids=["bf16", "bf16-mu-bf16", "f16"],
)
def test_low_precision_params_train_1000_steps(dtype, mu_dtype):
    (params, state), losses = _train_mlp(dtype, mu_dtype, steps=1000)
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert_finite(params=params, state=state)
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    assert losses[-1] < 1e-2 * losses[0]
    # Still improving in the second half, not stuck or drifting back up.
    assert losses[-100:].mean() < 0.7 * losses[200:300].mean()
