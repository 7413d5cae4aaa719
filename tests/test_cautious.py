"""cautious masks an inner transformation's update against the raw gradient.

The rule under test (``came_optax/_cautious.py``): per leaf, keep the update's
coordinates whose sign agrees with the gradient's and multiply them by
``1 / max(kept_fraction, floor)``; zero the others.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_python

from came_optax import cautious
from came_optax._cautious import cautious_factor


def fixed(updates):
    """An inner transformation whose output is ``updates``, whatever the gradient."""
    return optax.stateless(lambda grads, params: updates)


def masked(updates, grads, floor=1e-3, params=None):
    tx = cautious(fixed(updates), floor)
    return tx.update(grads, tx.init(grads), params)[0]


def test_hand_made_leaf():
    # agree, disagree, agree, disagree, zero grad, agree, zero update, agree (tiny:
    # the product 1e-60 underflows in float32 but the signs agree).
    u = jnp.array([1.0, -2.0, 3.0, 0.5, 4.0, -1.0, 0.0, 1e-30])
    g = jnp.array([2.0, 1.0, 1.0, -1.0, 0.0, -3.0, 5.0, 1e-30])
    out = masked({"w": u}, {"w": g})["w"]
    # 4 of 8 kept: factor 2.
    np.testing.assert_array_equal(out, np.float32([2.0, 0, 6.0, 0, 0, -2.0, 0, 2e-30]))


@pytest.mark.parametrize("floor", [1e-8, 1.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_all_disagreeing_leaf_is_zero_and_agreeing_leaf_unchanged(floor, dtype):
    big = float(jnp.finfo(dtype).max)
    tiny = float(jnp.finfo(dtype).tiny)  # normal: XLA on CPU flushes subnormals to zero
    bad = jnp.array([big, -tiny, 3.0, -1.0], dtype)
    good = jnp.array([big, -tiny, 3.0, -1.0], dtype)
    updates = {"bad": bad, "good": good}
    grads = {"bad": -bad.astype(jnp.float32), "good": good.astype(jnp.float32)}
    out = masked(updates, grads, floor)
    assert out["bad"].dtype == out["good"].dtype == dtype
    assert np.all(np.isfinite(np.asarray(out["bad"], np.float32)))
    np.testing.assert_array_equal(np.asarray(out["bad"], np.float32), 0.0)
    # kept fraction 1: multiplied by exactly 1.
    np.testing.assert_array_equal(np.asarray(out["good"], np.float32), np.asarray(good, np.float32))


@pytest.mark.parametrize("floor", [1e-3, 0.5, 1.0])
@pytest.mark.parametrize("kept", [1, 3, 7, 10])
def test_kept_coordinates_are_scaled_by_one_over_max_of_kept_fraction_and_floor(kept, floor):
    d = 10
    u = jnp.linspace(1.0, 2.0, d)
    g = jnp.where(jnp.arange(d) < kept, 1.0, -1.0)
    out = np.asarray(masked(u, g, floor))
    factor = 1.0 / max(kept / d, floor)
    np.testing.assert_allclose(out[:kept], np.asarray(u)[:kept] * factor, rtol=1e-6)
    np.testing.assert_array_equal(out[kept:], 0.0)


def test_complex_leaves_keep_coordinates_with_positive_real_inner_product():
    u = jnp.array([1 + 1j, 1 + 1j, 1j, 1.0 + 0j], jnp.complex64)
    # Re(conj(u) g): 0.5 (keep), -0.5, 1 (keep), 0 (drop: orthogonal).
    g = jnp.array([1 - 0.5j, -1 + 0.5j, 1j, 1j], jnp.complex64)
    out = masked(u, g)
    assert out.dtype == jnp.complex64
    np.testing.assert_array_equal(out, np.complex64([2 + 2j, 0, 2j, 0]))
    # The rule does not depend on the conjugation convention of the pair.
    np.testing.assert_array_equal(
        cautious_factor(jnp.conj(u), jnp.conj(g), 1e-3), cautious_factor(u, g, 1e-3)
    )


def test_weight_decay_outside_the_wrapper_is_not_masked():
    u = {"a": jnp.array([1.0, -1.0, 2.0, -2.0]), "b": jnp.array([1.0, 2.0])}
    g = {"a": jnp.ones(4), "b": -jnp.ones(2)}  # b disagrees everywhere
    params = {"a": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.array([-5.0, 6.0])}
    tx = optax.chain(cautious(fixed(u)), optax.add_decayed_weights(0.1))
    out = tx.update(g, tx.init(params), params)[0]
    # a: 2 of 4 kept, factor 2, then + 0.1 p; b: decay alone.
    np.testing.assert_allclose(out["a"], [2.1, 0.2, 4.3, 0.4], rtol=1e-7)
    np.testing.assert_allclose(out["b"], [-0.5, 0.6], rtol=1e-7)


def numpy_c_adamw(params, grads_seq, lr, b1, b2, eps, wd, floor):
    """C-AdamW in float64 (Liang et al., 2024, with the reference code's rescaling)."""
    p = {k: np.float64(v) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    history, fractions = [], []
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = np.float64(grads[k])
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            keep = u * g > 0
            fractions.append(keep.mean())
            u = np.where(keep, u / max(keep.mean(), floor), 0.0)
            p[k] = p[k] - lr * (u + wd * p[k])
        history.append({k: x.copy() for k, x in p.items()})
    return history, np.array(fractions)


@pytest.mark.parametrize("floor", [1e-3, 0.7])
def test_cautious_adam_matches_numpy_c_adamw(floor):
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 4), "b": (7,), "s": ()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads_seq = []
    for _ in range(6):
        grads = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        grads["w"][0] = 0.0  # zero gradient coordinates are masked
        grads_seq.append(grads)
    history, fractions = numpy_c_adamw(params, grads_seq, lr, b1, b2, eps, wd, floor)
    # The data give partial masks, some with a kept fraction below 0.7 (where that floor binds).
    assert np.any((fractions > 0.7) & (fractions < 1)) and np.any(
        (fractions > 0) & (fractions < 0.7)
    )

    tx = optax.chain(
        cautious(optax.scale_by_adam(b1, b2, eps), floor),
        optax.add_decayed_weights(wd),
        optax.scale_by_learning_rate(lr),
    )
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for grads, expected in zip(grads_seq, history, strict=True):
        updates, state = step(grads, state, p)
        p = optax.apply_updates(p, updates)
        for k in shapes:
            np.testing.assert_allclose(p[k], expected[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_compiles_once_across_steps():
    traces = []
    tx = optax.chain(cautious(optax.scale_by_adam()), optax.scale_by_learning_rate(1e-2))

    @jax.jit
    def step(params, state, grads):
        traces.append(None)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        params, state = step(params, state, grads)
    assert len(traces) == 1


def test_injected_floor_changes_the_scale_without_retracing():
    u = jnp.array([1.0, 2.0, 3.0, 4.0])
    g = jnp.array([1.0, -1.0, -1.0, -1.0])  # kept fraction 1/4
    traces = []
    tx = optax.inject_hyperparams(cautious)(inner=fixed(u), floor=0.5)

    @jax.jit
    def update(state):
        traces.append(None)
        return tx.update(g, state)

    state = tx.init(g)
    out, state = update(state)
    np.testing.assert_allclose(out, [2.0, 0, 0, 0], rtol=1e-7)  # 1 / max(1/4, 0.5)
    state.hyperparams["floor"] = jnp.asarray(0.1, jnp.float32)  # same aval: no retrace
    out, state = update(state)
    np.testing.assert_allclose(out, [4.0, 0, 0, 0], rtol=1e-7)  # 1 / max(1/4, 0.1)
    assert len(traces) == 1


@pytest.mark.parametrize("floor", [0.0, -1.0, 1.5, float("nan")])
def test_floor_out_of_range_is_a_value_error_naming_it(floor):
    with pytest.raises(ValueError, match=r"floor must be in \(0, 1\]"):
        cautious(optax.scale_by_adam(), floor)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from came_optax import cautious

    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"w": P("data", "model"), "b": P("data")}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    tx = optax.chain(cautious(optax.scale_by_adam()), optax.add_decayed_weights(0.1),
                     optax.scale_by_learning_rate(1e-2))
    rng = np.random.default_rng(0)
    shapes = {"w": (16, 8), "b": (8,)}
    params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads_seq = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
                 for _ in range(5)]

    def run(put):
        params = put(params0)
        state = jax.jit(tx.init)(params)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for grads in grads_seq:
            updates, state = step(params, state, put(grads))
            params = optax.apply_updates(params, updates)
        return params

    ref = run(lambda t: jax.tree.map(jnp.asarray, t))
    out = run(lambda t: jax.device_put(t, shardings))
    assert out["w"].sharding.spec == specs["w"], out["w"].sharding
    assert len(out["w"].sharding.device_set) == 8
    for k in shapes:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    print("max abs diff", max(float(jnp.max(jnp.abs(out[k] - ref[k]))) for k in shapes))
    """
)


@pytest.mark.multidevice
def test_sharded_over_eight_devices_equals_unsharded():
    # The kept fraction is a mean over the whole leaf, not over one shard.
    result = run_python(["-c", SHARDED_SCRIPT], devices=8, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max abs diff" in result.stdout
