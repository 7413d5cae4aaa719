"""stochastic_round_to_param_dtype: bf16/fp16 parameters become an unbiased rounding of p + u.

Statistical checks draw 2**14 roundings at once by vmapping the update over the step count
(the only state). The checks on 8 simulated devices run this file as a script in a
subprocess (see :func:`test_eight_devices_round_like_one`), so this process keeps one device.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import restore_target, run_python, tree_digest

from came_optax import StochasticRoundingState, stochastic_round_to_param_dtype
from came_optax._rounding import _exact_update

LOW_PRECISION = [jnp.bfloat16, jnp.float16]
DRAWS = 2**14
# Multiples of 2**-13 of a unit in the last place: p + u is then exact in float32 for both dtypes.
FRACTIONS = np.array([0.0, 1 / 8, 5 / 16, 1 / 2, 29 / 32, 8191 / 8192])
# Where the pair of neighbours sits: ordinary, negative, small, float16 subnormal, and the
# largest finite value, whose upper neighbour is infinity.
STARTS = {
    "bfloat16": [1.0, -3.0, 1e-3, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)],
    "float16": [1.0, -3.0, 1e-3, 5 * 2.0**-24, 65504.0],
}


def _bits_of(seed: int, count: int, leaf: int, shape) -> np.ndarray:
    """The documented random bits of leaf ``leaf`` at step ``count``."""
    key = jax.random.key(seed, impl="threefry2x32")
    key = jax.random.fold_in(jax.random.fold_in(key, count), leaf)
    return np.asarray(jax.random.bits(key, shape, jnp.uint32))


def _sr_oracle(x: np.ndarray, dtype, bits: np.ndarray) -> np.ndarray:
    """sr(x) in NumPy: the two neighbours of float32 ``x`` and the fraction in float64."""
    dtype = np.dtype(dtype)
    finfo = ml_dtypes.finfo(dtype)
    magnitude = np.abs(x.astype(np.float64))
    nearest = np.abs(x).astype(dtype)
    low_bits = nearest.view(np.uint16) - (nearest.astype(np.float64) > magnitude)
    low = low_bits.astype(np.uint16).view(dtype)
    high = (low_bits + 1).astype(np.uint16).view(dtype).astype(np.float64)
    top = float(finfo.max)
    step_past_max = top - float(np.nextafter(finfo.max, dtype.type(0)))
    high = np.where(np.isinf(high), top + step_past_max, high)
    fraction = (magnitude - low.astype(np.float64)) / (high - low.astype(np.float64))
    if dtype == np.dtype(ml_dtypes.bfloat16):
        up = (bits >> 16).astype(np.float64) + fraction * 2.0**16 >= 2.0**16
    else:
        up = (bits >> 8).astype(np.float64) < fraction * 2.0**24
    rounded = np.where(up, (low_bits + 1).astype(np.uint16).view(dtype), low)
    return np.where(np.signbit(x), -rounded, rounded)


def _neighbours(dtype, start: float) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(start, dtype)
    with np.errstate(over="ignore"):
        high = np.nextafter(low, np.asarray(np.copysign(np.inf, start), dtype))
    return low, high


@functools.cache
def _all_draws(dtype_name: str) -> np.ndarray:
    """DRAWS roundings of p + u = low + FRACTIONS * (high - low) with p = low, for every start
    of the dtype at once; shape (DRAWS, len(STARTS[dtype_name]), len(FRACTIONS))."""
    dtype = jnp.dtype(dtype_name)
    lows, spacings = [], []
    for start in STARTS[dtype_name]:
        low, high = _neighbours(dtype, start)
        spacing = high.astype(np.float64) - low.astype(np.float64)
        if np.isinf(spacing):  # past the largest value: the step to the next binade
            spacing = float(low) - float(np.nextafter(low, np.asarray(0, dtype)))
        lows.append(low)
        spacings.append(spacing)
    params = jnp.asarray(np.broadcast_to(np.asarray(lows, dtype)[:, None], (len(lows), 6)))
    updates = jnp.asarray(np.asarray(spacings)[:, None] * FRACTIONS, jnp.float32)
    tx = stochastic_round_to_param_dtype()

    def one(count):
        rounded, _ = tx.update(updates, StochasticRoundingState(count), params)
        return optax.apply_updates(params, rounded)

    return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(DRAWS, dtype=jnp.int32)))


def _draws(dtype_name: str, start: float) -> np.ndarray:
    return _all_draws(dtype_name)[:, STARTS[dtype_name].index(start)]


CASES = [(jnp.dtype(d).name, s) for d in LOW_PRECISION for s in STARTS[jnp.dtype(d).name]]


@pytest.mark.parametrize("dtype_name,start", CASES)
def test_results_are_one_of_the_two_neighbours(dtype_name, start):
    low, high = _neighbours(jnp.dtype(dtype_name), start)
    draws = _draws(dtype_name, start)
    if np.isinf(high):  # the largest finite value rounds up to infinity
        assert np.all((draws == low) | (draws == np.inf))
    else:
        assert np.all((draws == low) | (draws == high))


@pytest.mark.parametrize("dtype_name,start", CASES)
def test_mean_is_the_float32_value(dtype_name, start):
    low, high = _neighbours(jnp.dtype(dtype_name), start)
    low, high = float(low), float(high)
    if np.isinf(high):
        up_share = np.mean(np.isinf(_draws(dtype_name, start)), axis=0)
        assert np.all(
            np.abs(up_share - FRACTIONS) <= 5 * np.sqrt(FRACTIONS * (1 - FRACTIONS) / DRAWS)
        )
        return
    mean = np.mean(_draws(dtype_name, start).astype(np.float64), axis=0)
    exact = low + FRACTIONS * (high - low)
    standard_error = abs(high - low) * np.sqrt(FRACTIONS * (1 - FRACTIONS) / DRAWS)
    # Five standard errors; zero for fraction 0, where the value is representable.
    assert np.all(np.abs(mean - exact) <= 5 * standard_error), (mean - exact) / abs(high - low)


@functools.partial(jax.jit, static_argnums=0)
def _rounded(tx, updates, state, params):
    """New parameters and state after one update of ``tx`` and optax.apply_updates."""
    rounded, state = tx.update(updates, state, params)
    return optax.apply_updates(params, rounded), state


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_representable_values_never_move(dtype):
    rng = np.random.default_rng(1)
    params = jnp.asarray(rng.standard_normal(512), dtype)
    target = jnp.asarray(rng.standard_normal(512), dtype)
    updates = target.astype(jnp.float32) - params.astype(jnp.float32)
    tx = stochastic_round_to_param_dtype()
    state = tx.init(params)
    for _ in range(3):
        new, state = _rounded(tx, updates, state, params)
        np.testing.assert_array_equal(new, target)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_weight_decay_is_rounded_with_the_step(dtype):
    """add_decayed_weights + scale_by_learning_rate + rounding == sr(p - lr (wd p + g)), with
    steps from far below the parameters' resolution to larger than the parameters."""
    rng = np.random.default_rng(2)
    params = {
        "w": jnp.asarray(rng.standard_normal((16, 8)), dtype),
        "b": jnp.asarray(rng.standard_normal(8) * 1e-2, dtype),
    }
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-4, 2, p.shape)),
        params,
    )
    step = optax.chain(optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(0.05))
    tx = optax.chain(step, stochastic_round_to_param_dtype(seed=7))
    state = tx.init(params)
    for count in range(2):
        step_updates = jax.jit(step.update)(grads, step.init(params), params)[0]
        new, state = _rounded(tx, grads, state, params)
        for leaf, name in enumerate(sorted(params)):  # jax.tree.leaves order
            x = np.asarray(params[name], np.float32) + np.asarray(step_updates[name])
            oracle = _sr_oracle(x, dtype, _bits_of(7, count, leaf, x.shape))
            np.testing.assert_array_equal(np.asarray(new[name]), oracle, err_msg=name)
        params = new


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_weight_decay_below_the_resolution_acts_on_average(dtype):
    """p = 1, g = 0, lr * wd = 1e-4: round-to-nearest keeps 1; the mean is 0.9999."""
    params = jnp.ones(DRAWS, dtype)
    tx = optax.chain(
        optax.add_decayed_weights(1e-3),
        optax.scale_by_learning_rate(0.1),
        stochastic_round_to_param_dtype(),
    )
    new = np.asarray(_rounded(tx, jnp.zeros(DRAWS), tx.init(params), params)[0], np.float64)
    low = float(np.nextafter(np.asarray(1.0, dtype), np.asarray(0, dtype)))
    fraction = 1e-4 / (1.0 - low)  # how far 0.9999 lies below 1, in units of the spacing
    assert np.all((new == 1.0) | (new == low))
    standard_error = (1.0 - low) * np.sqrt(fraction * (1 - fraction) / DRAWS)
    assert abs(new.mean() - 0.9999) <= 5 * standard_error


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_small_updates_accumulate_where_round_to_nearest_stalls(dtype):
    """1000 steps of +1e-4 from 1.0: round-to-nearest stays at 1.0, the rounding reaches 1.1."""
    sgd = optax.sgd(1e-4)

    @functools.partial(jax.jit, static_argnums=0)
    def train(tx):
        params = jnp.ones(256, dtype)

        def body(carry, _):
            params, state = carry
            updates, state = tx.update(-jnp.ones(256), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, tx.init(params)), length=1000)[0][0]

    nearest = train(sgd)
    rounded = np.asarray(train(optax.chain(sgd, stochastic_round_to_param_dtype())), np.float64)
    np.testing.assert_array_equal(nearest, np.ones(256, dtype))
    # The spread after 1000 steps is about 0.028 per element (bfloat16), 0.0018 for the mean.
    assert abs(rounded.mean() - 1.1) < 0.01


def test_same_seed_same_bits_other_seed_other_bits():
    params = jnp.ones(1024, jnp.bfloat16)
    updates = jnp.full(1024, 2.0**-8)  # halfway between 1 and 1 + 2**-7

    def step(seed):
        tx = stochastic_round_to_param_dtype(seed)
        return np.asarray(_rounded(tx, updates, tx.init(params), params)[0])

    np.testing.assert_array_equal(step(0), step(0))
    assert 0.4 < np.mean(step(0) != step(1)) < 0.6


def test_leaves_and_steps_draw_independent_bits():
    leaf = jnp.ones(4096, jnp.float16)
    params = {"a": leaf, "b": leaf}
    updates = {"a": jnp.full(4096, 2.0**-11), "b": jnp.full(4096, 2.0**-11)}  # halfway
    tx = stochastic_round_to_param_dtype()
    first, state = _rounded(tx, updates, tx.init(params), params)
    second, state = _rounded(tx, updates, state, params)
    assert int(state.count) == 2
    # Independent fair coins disagree half of the time; identical bits never would.
    assert 0.45 < np.mean(np.asarray(first["a"] != first["b"])) < 0.55
    assert 0.45 < np.mean(np.asarray(first["a"] != second["a"])) < 0.55


@pytest.mark.parametrize(
    "dtype,ratio_bound",
    [(ml_dtypes.bfloat16, 2.0**-16), (np.float16, 2.0**-13)],
    ids=["bfloat16", "float16"],
)
def test_float32_update_reaches_every_rounded_value(dtype, ratio_bound):
    """apply_updates(b, f32(a) - f32(b)) == a for every finite a and b in [1, 2) of either sign
    (every eighth b) whenever a == 0 or |a| >= ratio_bound |b|; otherwise within 2**-24 |b|."""
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    magnitudes = np.abs(values.astype(np.float32))
    a = values[np.isfinite(magnitudes)]
    b = values[(magnitudes >= 1) & (magnitudes < 2)][::8]

    # Only the step under test is compiled; the checks run in numpy, so that no compiler can
    # keep the result in float32 or flush subnormals while comparing.
    apply = jax.jit(
        lambda a, b: optax.apply_updates(jnp.broadcast_to(b, (b.size, a.size)), _exact_update(a, b))
    )
    result = np.asarray(apply(a[None, :], b[:, None])).astype(np.float32)
    a32, b32 = a.astype(np.float32)[None, :], b.astype(np.float32)[:, None]
    reachable = (a32 == 0) | (np.abs(a32) >= ratio_bound * np.abs(b32))
    assert np.sum(reachable & (result != a32)) == 0
    assert np.max(np.abs(result - a32) / np.abs(b32)) <= 2.0**-24


def test_non_finite_values_pass_through():
    params = jnp.asarray([1.0, 1.0, 1.0, jnp.inf, jnp.nan, 3e38], jnp.bfloat16)
    updates = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 1.0, 1.0, 3e38], jnp.float32)
    tx = stochastic_round_to_param_dtype()
    rounded, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    np.testing.assert_array_equal(rounded, updates)
    np.testing.assert_array_equal(
        optax.apply_updates(params, rounded).astype(jnp.float32),
        optax.apply_updates(params, updates).astype(jnp.float32),
    )


def test_float32_parameters_pass_through_and_others_round():
    params = {"w": jnp.ones(8, jnp.bfloat16), "scale": jnp.ones(8, jnp.float32)}
    updates = {"w": jnp.full(8, 1e-3), "scale": jnp.full(8, 1e-3)}
    tx = stochastic_round_to_param_dtype()
    rounded, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    assert rounded["scale"].dtype == jnp.float32 and rounded["w"].dtype == jnp.float32
    np.testing.assert_array_equal(rounded["scale"], updates["scale"])
    assert set(np.asarray(rounded["w"]).tolist()) <= {0.0, 2.0**-7}


def test_update_without_params_names_the_transform():
    tx = stochastic_round_to_param_dtype()
    with pytest.raises(ValueError, match="stochastic_round_to_param_dtype needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_integer_parameters_are_rejected():
    params = {"step": jnp.zeros(2, jnp.int32)}
    tx = stochastic_round_to_param_dtype()
    with pytest.raises(TypeError, match=r"\['step'\] has dtype int32"):
        tx.update({"step": jnp.zeros(2)}, tx.init(params), params)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_invalid_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed must"):
        stochastic_round_to_param_dtype(seed)


# Momentum SGD on fixed per-step gradients, then the rounding.
TRAIN_TX = optax.chain(
    optax.sgd(3e-3, momentum=0.9, accumulator_dtype=jnp.float32),
    stochastic_round_to_param_dtype(seed=5),
)


@jax.jit
def _train_step(params, state, t):
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size).reshape(p.shape) + t), params)
    updates, state = TRAIN_TX.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _train(params, steps: int, start: int = 0, state=None):
    if state is None:  # committed like restored arrays, so that one compilation serves all
        state = jax.jit(TRAIN_TX.init)(params)
    for t in range(start, start + steps):
        params, state = _train_step(params, state, t)
    return params, state


def _init_params() -> dict:
    rng = np.random.default_rng(3)
    params = {
        "w": jnp.asarray(rng.standard_normal((12, 8)), jnp.bfloat16),
        "h": jnp.asarray(rng.standard_normal(10), jnp.float16),
        "f": jnp.asarray(rng.standard_normal(4), jnp.float32),
    }
    return jax.device_put(params, jax.devices()[0])


def test_resume_from_an_orbax_checkpoint_is_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    uninterrupted = _train(_init_params(), 6)
    saved = _train(_init_params(), 3)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "step3", saved)
    # A fresh process knows only the parameters' shapes and the optimizer.
    target = restore_target((_init_params(), jax.eval_shape(TRAIN_TX.init, _init_params())))
    with ocp.StandardCheckpointer() as checkpointer:
        params, state = checkpointer.restore(tmp_path / "step3", target)
    assert int(state[1].count) == 3
    assert tree_digest(_train(params, 3, start=3, state=state)) == tree_digest(uninterrupted)


def _multidevice_params() -> dict:
    rng = np.random.default_rng(4)
    return {
        "w": jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16),
        "h": jnp.asarray(rng.standard_normal((8, 16)), jnp.float16),
    }


def _eight_device_report() -> dict:
    """Training on meshes of 8 devices vs one device; data-parallel replicas under shard_map."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    params = _multidevice_params()
    reference = _train(jax.device_put(params, jax.devices()[0]), 1)[0]
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"w": P("data", "model"), "h": P("model", "data")}
    placed = {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in params.items()}
    sharded = _train(placed, 1)[0]

    # Data-parallel replicas: each device updates its own full copy.
    def replica(params):
        new, _ = _train_step(params, TRAIN_TX.init(params), 0)
        return jax.tree.map(lambda x: x[None], new)

    flat = Mesh(np.asarray(jax.devices()), ("data",))
    replicas = jax.jit(jax.shard_map(replica, mesh=flat, in_specs=P(), out_specs=P("data")))
    per_device = replicas(params)
    return {
        "devices": jax.device_count(),
        "sharded": {k: not x.sharding.is_fully_replicated for k, x in sharded.items()},
        "sharded_equal": tree_digest(sharded) == tree_digest(reference),
        "replicas_equal": all(
            tree_digest(jax.tree.map(lambda x, i=i: x[i], per_device)) == tree_digest(reference)
            for i in range(8)
        ),
        "digest": tree_digest(reference),
    }


@pytest.mark.multidevice
def test_eight_devices_round_like_one():
    result = run_python([__file__], devices=8, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert all(report["sharded"].values()), report["sharded"]
    assert report["sharded_equal"]
    assert report["replicas_equal"]
    # This process, with one device, draws the same bits as that one.
    params = jax.device_put(_multidevice_params(), jax.devices("cpu")[0])
    assert tree_digest(_train(params, 1)[0]) == report["digest"]


if __name__ == "__main__":
    print(json.dumps(_eight_device_report()))
