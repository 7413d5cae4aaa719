"""Checkpoints of other versions and precisions: upgrade, check, and momentum conversion.

``tests/golden/came_optax_0_1_0_state`` was written by came_optax 0.1.0 (see
``tests/golden/make_state_0_1_0.py``): the optimizer states after 3 steps with NumPy gradients,
the gradient of the next step and 0.1.0's update for it. Restored raw (a fresh process cannot
name 0.1.0's state types), it must upgrade to the state the current code reaches from the same
gradients and go on training as 0.1.0 would have.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, assert_bitwise_equal

import came_optax
from came_optax import _quantize

ocp = pytest.importorskip("orbax.checkpoint")

GOLDEN = REPO / "tests" / "golden" / "came_optax_0_1_0_state"
STEPS = 3  # the updates applied before the save (make_state_0_1_0.STEPS)
# The optimizers of make_state_0_1_0.py, by the prefix of their entries there.
OPTIMIZERS = {
    "": functools.cache(lambda: came_optax.came(1e-2, weight_decay=1e-2)),
    "injected_": functools.cache(
        lambda: optax.inject_hyperparams(came_optax.came)(
            learning_rate=1e-2, weight_decay=1e-2, mu_dtype="bfloat16"
        )
    ),
}
# Old and new code run the same float32 operations but need not order them alike: states and
# updates agree to this fraction of each leaf's largest entry (measured: bit for bit op by op,
# 3.1e-7 with the current code's steps compiled).
RTOL = 1e-6


@pytest.fixture(scope="module")
def golden():
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(GOLDEN)


def assert_close(actual, expected, rtol=RTOL):
    """Same structure, shapes and dtypes; each leaf within ``rtol`` of its largest entry."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        where = jax.tree_util.keystr(path)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), where
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(
            a, b, rtol=0, atol=rtol * np.max(np.abs(b), initial=0), err_msg=where
        )


@functools.cache
def jitted(tx):
    """``tx``'s update, compiled once per optimizer."""
    return jax.jit(tx.update)


def replay(tx, params, grads, state=None):
    """``tx`` applied to ``grads`` in turn from ``params``: (params, state, last updates)."""
    state, updates = tx.init(params) if state is None else state, None
    for g in grads:
        updates, state = jitted(tx)(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, updates


# --- Layout 0.1.0 --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", list(OPTIMIZERS))
def test_golden_checkpoint_is_recognised_as_the_0_1_0_layout(prefix, golden):
    old = golden[f"{prefix}opt_state"]
    assert came_optax.state_layout_version(old) == 1
    tx = OPTIMIZERS[prefix]()
    assert came_optax.state_layout_version(tx.init(golden["params0"])) == 2
    with pytest.raises(ValueError, match="0.1.0 layout.*upgrade_state"):
        came_optax.check_state(old, tx, golden[f"{prefix}params"])


@pytest.mark.parametrize("prefix", list(OPTIMIZERS))
def test_0_1_0_state_upgrades_to_the_state_the_current_code_reaches(prefix, golden):
    tx, params = OPTIMIZERS[prefix](), golden[f"{prefix}params"]
    upgraded = came_optax.upgrade_state(golden[f"{prefix}opt_state"], tx, params)
    came_optax.check_state(upgraded, tx, params)

    replayed_params, replayed, _ = replay(tx, golden["params0"], golden["grads"][:STEPS])
    assert_close(replayed_params, params)
    assert_close(upgraded, replayed)
    # Unused statistics became the placeholders of the current layout.
    came = optax.tree.get(upgraded, "v_row")
    assert came["dense"]["bias"].shape == came["scale"].shape == (1,)


@pytest.mark.parametrize("prefix", list(OPTIMIZERS))
def test_upgraded_0_1_0_state_trains_on_as_0_1_0_did(prefix, golden):
    tx, params = OPTIMIZERS[prefix](), golden[f"{prefix}params"]
    state = came_optax.upgrade_state(golden[f"{prefix}opt_state"], tx, params)
    grads = list(golden["grads"]) + list(reversed(golden["grads"]))
    _, _, updates = replay(tx, params, grads[STEPS : STEPS + 1], state)
    assert_close(updates, golden[f"{prefix}next_updates"])  # 0.1.0's own next step

    # Then as a run of the current code that never stopped.
    params, state, _ = replay(tx, params, grads[STEPS:], state)
    uninterrupted_params, uninterrupted, _ = replay(tx, golden["params0"], grads)
    assert_close(params, uninterrupted_params)
    assert_close(state, uninterrupted)


def _rename(tree, old, new):
    return {new if k == old else k: v for k, v in tree.items()}


def _reshape_kernel(params):
    return {**params, "dense": {**params["dense"], "kernel": jnp.zeros((6, 5))}}


# (how the checkpoint or the target differs, the error's leaf and expected shape and dtype)
MISMATCHES = {
    "renamed parameter": (
        lambda tx, params, state: (tx, _rename(params, "dense", "mlp"), state),
        "state[0].mu['dense'] is in the checkpoint but not in the state",
    ),
    "other shape": (
        lambda tx, params, state: (tx, _reshape_kernel(params), state),
        "state[0].mu['dense']['kernel'] should have shape (6, 5) and dtype float32; "
        "the checkpoint has shape (6, 4)",
    ),
    "other factoring": (
        lambda tx, params, state: (
            came_optax.came(1e-2, weight_decay=1e-2, min_dim_size_to_factor=5),
            params,
            state,
        ),
        "state[0].v_row['conv'] should have shape (1,) and dtype float32; "
        "the checkpoint has shape (3, 3, 2)",
    ),
    "other momentum dtype": (
        lambda tx, params, state: (
            came_optax.came(1e-2, weight_decay=1e-2, mu_dtype="bfloat16"),
            params,
            state,
        ),
        "state[0].mu['conv'] should have shape (3, 3, 2, 4) and dtype bfloat16; the checkpoint "
        "has shape (3, 3, 2, 4) and dtype float32. Change the momentum's dtype with "
        "came_optax.convert_momentum",
    ),
}


@pytest.mark.parametrize("layout", ["0.1.0", "current"])
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_mismatched_state_is_refused_naming_the_leaf(mismatch, layout, golden):
    tx, params = OPTIMIZERS[""](), golden["params"]
    state = golden["opt_state"]
    if layout == "current":
        state = came_optax.upgrade_state(state, tx, params)
    change, message = MISMATCHES[mismatch]
    tx, params, state = change(tx, params, state)
    with pytest.raises(ValueError, match=re.escape(f"upgrade_state: {message}")):
        came_optax.upgrade_state(state, tx, params)
    if layout == "current":
        with pytest.raises(ValueError, match=re.escape(f"check_state: {message}")):
            came_optax.check_state(state, tx, params)


def test_0_1_0_stages_with_different_counts_are_refused(golden):
    old = list(golden["opt_state"])
    old[0] = {**old[0], "count": old[0]["count"] + 1}
    with pytest.raises(ValueError, match=r"state holds 0.1.0 stages with different step counts"):
        came_optax.upgrade_state(old, OPTIMIZERS[""](), golden["params"])


def test_0_1_0_per_leaf_tuple_of_another_length_is_refused(golden):
    old = list(golden["opt_state"])
    old[0] = {**old[0], "v": old[0]["v"][:-1]}
    with pytest.raises(
        ValueError, match=re.escape("state[0].v holds 3 per-leaf entries (the 0.1.0 layout)")
    ):
        came_optax.upgrade_state(old, OPTIMIZERS[""](), golden["params"])


# --- The current layout --------------------------------------------------------------------------


def test_upgrade_leaves_a_current_state_as_it_is(golden, tmp_path):
    tx, params = OPTIMIZERS["injected_"](), golden["params0"]
    _, state, _ = replay(tx, params, golden["grads"][:2])
    assert_bitwise_equal(came_optax.upgrade_state(state, tx, params), state)
    # Restored without a target: dicts for NamedTuples, lists for tuples, None for EmptyState.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(tmp_path / "state")
    assert not isinstance(raw, tuple)
    assert came_optax.state_layout_version(raw) == 2
    assert_bitwise_equal(came_optax.upgrade_state(raw, tx, params), state)


def test_field_appended_since_the_save_takes_its_initial_value(golden):
    tx, params = OPTIMIZERS[""](), golden["params0"]
    _, state, _ = replay(tx, params, golden["grads"][:2])
    came = state[0]._asdict()
    del came["mu_scale"]  # as a checkpoint from before the int8 momentum holds it
    upgraded = came_optax.upgrade_state((came, *state[1:]), tx, params)
    assert_bitwise_equal(upgraded, state)
    # A field missing from the middle is not "appended": it is refused.
    del came["v_col"]
    with pytest.raises(
        ValueError, match=re.escape("state[0].v_col is missing from the checkpoint")
    ):
        came_optax.upgrade_state((came, *state[1:]), tx, params)


def _boxed_params(kind):
    if kind == "nnx.Param":
        nnx = pytest.importorskip("flax.nnx")
        return nnx.State({"w": nnx.Param(jnp.ones((4, 3))), "b": jnp.zeros(3)})
    nn = pytest.importorskip("flax.linen")
    return {"w": nn.Partitioned(jnp.ones((4, 3)), names=("a", "b")), "b": jnp.zeros(3)}


@pytest.mark.parametrize("kind", ["nnx.Param", "nn.Partitioned"])
def test_metadata_boxes_of_the_momentum_survive_upgrade_and_conversion(kind):
    params = _boxed_params(kind)
    tx = came_optax.came(1e-3)
    state = tx.init(params)
    assert_bitwise_equal(came_optax.upgrade_state(state, tx, params), state)
    converted = came_optax.convert_momentum(state, "bfloat16")
    assert jax.tree.structure(converted) == jax.tree.structure(state)
    assert {x.dtype for x in jax.tree.leaves(converted[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    came_optax.check_state(converted, came_optax.came(1e-3, mu_dtype="bfloat16"), params)


def test_layout_version_needs_a_came_state():
    with pytest.raises(ValueError, match="holds no CAME state"):
        came_optax.state_layout_version(optax.adam(1e-3).init({"w": jnp.ones(3)}))


# --- Momentum precision --------------------------------------------------------------------------

# A leaf large enough for int8 blocks (64x128 in 16x16 tiles) beside leaves that stay float32.
PRECISION_PARAMS = {"w": (64, 128), "b": (128,), "k": (3, 3, 4, 8)}


@functools.cache
def came_with(mu_dtype):
    return came_optax.came(1e-2, mu_dtype=mu_dtype)


def _trained(mu_dtype, steps=3):
    """Parameters and ``came_with(mu_dtype)``'s state after ``steps`` steps, the next gradient."""
    rng = np.random.default_rng(7)
    draws = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in PRECISION_PARAMS.items()}
        for _ in range(steps + 2)
    ]
    params, state, _ = replay(came_with(mu_dtype), draws[0], draws[1 : steps + 1])
    return params, state, draws[steps + 1]


def _mu(state):
    return state[0].mu


def test_float32_to_bfloat16_and_back_rounds_the_momentum_once():
    params, state, _ = _trained(None)
    there = came_optax.convert_momentum(state, jnp.bfloat16)
    came_optax.check_state(there, came_with("bfloat16"), params)
    back = came_optax.convert_momentum(there, None)
    rounded = jax.tree.map(lambda m: m.astype(jnp.bfloat16).astype(jnp.float32), _mu(state))
    assert_bitwise_equal(_mu(back), rounded)
    assert_bitwise_equal(back[0]._replace(mu=None), state[0]._replace(mu=None))
    assert_bitwise_equal(back[1:], state[1:])


@pytest.mark.parametrize("mu_dtype", ["bfloat16", "int8"])
def test_narrow_momentum_to_float32_and_back_is_exact(mu_dtype):
    params, state, _ = _trained(mu_dtype)
    wide = came_optax.convert_momentum(state, jnp.float32)
    came_optax.check_state(wide, came_with(None), params)
    back = came_optax.convert_momentum(wide, mu_dtype)
    # int8 values come back; a block's scale is recomputed as max|q s| / 127, which can round
    # to the neighbouring float32.
    assert_bitwise_equal(
        (back[0]._replace(mu_scale=None), back[1:]), (state[0]._replace(mu_scale=None), state[1:])
    )
    assert_close(back[0].mu_scale, state[0].mu_scale, rtol=2.0**-23)


def test_float32_to_int8_quantizes_the_large_leaves_only():
    params, state, _ = _trained(None)
    there = came_optax.convert_momentum(state, "int8")
    came_optax.check_state(there, came_with("int8"), params)
    block = _quantize.block_shape(PRECISION_PARAMS["w"])
    q, scale = _quantize.quantize(_mu(state)["w"], block)
    assert_bitwise_equal((_mu(there)["w"], there[0].mu_scale["w"]), (q, scale))
    assert_bitwise_equal({k: _mu(there)[k] for k in "bk"}, {k: _mu(state)[k] for k in "bk"})
    back = came_optax.convert_momentum(there, None)
    np.testing.assert_array_equal(_mu(back)["w"], _quantize.dequantize(q, scale, block))


@pytest.mark.parametrize("mu_dtype", ["bfloat16", "int8"])
def test_switching_to_float32_at_a_checkpoint_takes_the_same_next_step(mu_dtype):
    """The step reads the momentum in float32 either way. Run op by op the arithmetic is the
    same, so bit for bit; compiled, XLA fuses the narrow program differently (a few ulps)."""
    params, state, grads = _trained(mu_dtype)
    expected_updates, expected_state = came_with(mu_dtype).update(grads, state, params)
    wide_state = came_optax.convert_momentum(state, None)
    updates, wide_state = came_with(None).update(grads, wide_state, params)
    assert_bitwise_equal(updates, expected_updates)
    assert_bitwise_equal(came_optax.convert_momentum(wide_state, mu_dtype), expected_state)


@pytest.mark.parametrize(
    ("state", "mu_dtype", "message"),
    [
        (optax.adam(1e-3).init({"w": jnp.ones(3)}), None, "holds no ScaleByCameState"),
        (came_optax.came(1e-3).init({"w": jnp.ones(3)}), "int32", "mu_dtype must be"),
        (
            came_optax.came(1e-3).init({"w": jnp.ones(3, jnp.complex64)}),
            "bfloat16",
            "cannot hold the complex momentum of ['w']",
        ),
    ],
)
def test_convert_momentum_refuses_what_it_cannot_convert(state, mu_dtype, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        came_optax.convert_momentum(state, mu_dtype)
