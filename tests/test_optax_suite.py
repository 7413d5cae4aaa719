"""optax's own optimizer tests, run on ``came()`` and ``came(debias=True)``.

optax ships the tests of its aliases as ``optax/_src/alias_test.py``. The tests there that are
parametrised over optimizers are re-run here, unchanged, on CAME: each body is called with a
namespace in which ``came`` is the optimizer under test (``opt_name='came'``) and with the same
problems, step counts and tolerances as for optax's own optimizers:

* ``test_optimization``: parabola and Rosenbrock, float32 and complex64, 10000 jitted steps,
  final parameters within ``rtol = atol = 3e-2``; no recompilation on the second step;
  ``optax.tree.map_params`` on the state;
* ``test_optimizers_accept_extra_args``;
* ``test_optimizers_can_be_wrapped_in_inject_hyperparams``: updates within ``rtol=1e-3``,
  states within ``rtol=1e-4`` (optax 0.2.8);
* ``test_preserve_dtype``: bfloat16 and float32 updates keep the gradient's dtype;
* ``test_state_shape_dtype_shard_stability``: float16 to complex128, the state keeps its
  shapes and dtypes through ``lax.cond``;
* ``test_gradient_accumulation``: ``optax.MultiSteps`` returns zero updates between steps.

``test_explicit_dtype`` hard-codes its optimizers, so it is restated for ``came``'s
``mu_dtype``. Where CAME departs from optax's expectation on purpose the case is marked
``xfail(strict=True)`` with the reason (README, "optax's test suite"). The learning rate is
1e-2 for both forms, a tenth of the 1e-1 optax tests ``adam`` with.

Then tests of our own: ``optax.tree.map_params``, ``optax.tree.get`` and ``optax.tree.set``
on CAME's state, and complex parameters.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close_to_movement
from reference_numpy import came_numpy, came_step, init_state

import came_optax

try:  # needs absl, scipy and scikit-learn (the ``test`` extra)
    from optax._src import alias_test as optax_alias_test
except ImportError as error:  # pragma: no cover - depends on the environment
    optax_alias_test = None
    OPTAX_TESTS_MISSING = f"optax's alias tests cannot be imported: {error}"

CONFIGS = {
    "came": {"learning_rate": 1e-2},
    "came-debias": {"learning_rate": 1e-2, "debias": True},
}
with_configs = pytest.mark.parametrize("opt_kwargs", list(CONFIGS.values()), ids=list(CONFIGS))


@pytest.fixture
def optax_case(monkeypatch):
    """An ``AliasTest`` instance whose bodies build ``came_optax.came`` for ``opt_name='came'``."""
    if optax_alias_test is None:
        pytest.skip(OPTAX_TESTS_MISSING)
    monkeypatch.setattr(optax_alias_test, "alias", types.SimpleNamespace(came=came_optax.came))
    case = optax_alias_test.AliasTest()
    case.variant = jax.jit  # optax < 0.2.6 runs some bodies under chex variants
    return case


def optax_test(name: str):
    """The undecorated body of optax's ``AliasTest.<name>``."""
    for method in vars(optax_alias_test.AliasTest).values():
        fn = method
        while fn is not None:
            if getattr(fn, "__name__", None) == name and not hasattr(fn, "__wrapped__"):
                return fn
            fn = getattr(fn, "__wrapped__", None)
    pytest.skip(f"optax {optax.__version__} has no AliasTest.{name}")


# ---------------------------------------------------------------------------------------------
# optax's common tests, unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@with_configs
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["float32", "complex64"])
@pytest.mark.parametrize("target", ["parabola", "rosenbrock"])
def test_optimization(optax_case, opt_kwargs, target, dtype):
    """optax ``AliasTest.test_optimization``: 10000 steps reach the minimum within 3e-2."""
    setup = getattr(optax_alias_test, f"_setup_{target}")
    optax_test("test_optimization")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs, target=setup, dtype=dtype
    )


@with_configs
def test_optimizers_accept_extra_args(optax_case, opt_kwargs):
    """optax ``AliasTest.test_optimizers_accept_extra_args``."""
    optax_test("test_optimizers_accept_extra_args")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs
    )


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="injected betas are float32 arrays and 1 - float32(0.9999) is 1.66e-4 relative away "
    "from 1e-4, so the instability statistics differ from plain came() by more than optax's "
    "rtol=1e-4; see test_injected_equals_plain_given_float32_hyperparameters",
)
@with_configs
def test_optimizers_can_be_wrapped_in_inject_hyperparams(optax_case, opt_kwargs):
    """optax ``AliasTest.test_optimizers_can_be_wrapped_in_inject_hyperparams``."""
    optax_test("test_optimizers_can_be_wrapped_in_inject_hyperparams")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs
    )


@with_configs
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(optax_case, opt_kwargs, dtype):
    """optax ``AliasTest.test_preserve_dtype``: updates have the gradients' dtype."""
    optax_test("test_preserve_dtype")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs, dtype=dtype
    )


STABILITY_DTYPES = [
    jnp.float16,
    jnp.bfloat16,
    jnp.float32,
    jnp.float64,
    jnp.complex64,
    jnp.complex128,
]


@with_configs
@pytest.mark.parametrize("dtype", STABILITY_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_state_shape_dtype_shard_stability(optax_case, opt_kwargs, dtype):
    """optax ``AliasTest.test_state_shape_dtype_shard_stability``, float16 to complex128."""
    optax_test("test_state_shape_dtype_shard_stability")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs, dtype=dtype
    )


@with_configs
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation(optax_case, opt_kwargs, dtype):
    """optax ``AliasTest.test_gradient_accumulation``: ``MultiSteps`` gives zero updates."""
    optax_test("test_gradient_accumulation")(
        optax_case, opt_name="came", opt_kwargs=opt_kwargs, dtype=dtype
    )


# ---------------------------------------------------------------------------------------------
# optax's test_explicit_dtype, restated for came's mu_dtype
# ---------------------------------------------------------------------------------------------

DTYPE_NAMES = ["bfloat16", "float32", "complex64", None]
REAL_DTYPES = ("bfloat16", "float32", None)


def _explicit_dtype_cases():
    float32_state = pytest.mark.xfail(
        strict=True,
        raises=AssertionError,
        reason="bfloat16 parameters keep float32 momentum and statistics, as in came-pytorch",
    )
    complex_momentum = pytest.mark.xfail(
        strict=True,
        raises=ValueError,
        reason="a real mu_dtype cannot hold a complex momentum: came raises instead of "
        "dropping the imaginary part",
    )
    real_momentum = pytest.mark.xfail(
        strict=True,
        raises=ValueError,
        reason="mu_dtype must be a real floating dtype for real parameters",
    )
    cases = []
    for params_dtype in DTYPE_NAMES:
        for state_dtype in DTYPE_NAMES:
            marks = []
            if params_dtype == "bfloat16" and state_dtype is None:
                marks = [float32_state]
            elif params_dtype == "complex64" and state_dtype in ("bfloat16", "float32"):
                marks = [complex_momentum]
            elif params_dtype in REAL_DTYPES and state_dtype == "complex64":
                marks = [real_momentum]
            cases.append(
                pytest.param(
                    params_dtype, state_dtype, marks=marks, id=f"{params_dtype}-{state_dtype}"
                )
            )
    return cases


@pytest.mark.parametrize("params_dtype,state_dtype", _explicit_dtype_cases())
def test_explicit_dtype(params_dtype, state_dtype):
    """optax ``AliasTest.test_explicit_dtype``: ``optax.tree.get(state, 'mu')`` has
    ``mu_dtype``, or the parameters' dtype when ``mu_dtype`` is None."""
    params = jnp.array([0.0, 0.0], dtype=params_dtype)
    mu = optax.tree.get(came_optax.came(0.1, mu_dtype=state_dtype).init(params), "mu")
    expected = params.dtype if state_dtype is None else jnp.dtype(state_dtype)
    assert mu.dtype == expected


# ---------------------------------------------------------------------------------------------
# inject_hyperparams: the deviation above is the rounding of the hyperparameters, nothing else
# ---------------------------------------------------------------------------------------------

F32_DEFAULTS = {
    name: float(np.float32(value))
    for name, value in dict(b1=0.9, b2=0.999, b3=0.9999, eps1=1e-30, eps2=1e-16).items()
}


def _c128(x):
    return np.asarray(x, np.complex128)


def _max_relative_difference(actual, expected):
    """The largest elementwise relative difference over two trees of arrays."""
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    return max(
        float(np.max(np.abs(_c128(a) - _c128(b)) / np.maximum(np.abs(_c128(b)), 1e-30)))
        for a, b in pairs
    )


@functools.cache
def _inject_problem(config: str, injected: bool, float32_hyperparameters: bool):
    """optax's inject_hyperparams problem, five jitted steps; returns (updates, came state)."""
    factory = optax.inject_hyperparams(came_optax.came) if injected else came_optax.came
    hyperparameters = F32_DEFAULTS if float32_hyperparameters else {}
    tx = factory(**CONFIGS[config], **hyperparameters)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        updates, state = update(grads, state, params)
    return updates, state.inner_state if injected else state


@pytest.mark.parametrize("config", list(CONFIGS))
def test_injected_equals_plain_given_float32_hyperparameters(config):
    """With float32-representable betas and eps, injected and plain came() agree to 1e-6."""
    updates_inj, state_inj = _inject_problem(config, injected=True, float32_hyperparameters=True)
    updates, state = _inject_problem(config, injected=False, float32_hyperparameters=True)
    assert _max_relative_difference(updates_inj, updates) <= 1e-6
    assert _max_relative_difference(state_inj, state) <= 1e-6


def test_injected_state_differs_by_the_float32_rounding_of_one_minus_b3():
    """With the default b3 = 0.9999 the states differ by at most that rounding (1.66e-4)."""
    _, state_inj = _inject_problem("came", injected=True, float32_hyperparameters=False)
    _, state = _inject_problem("came", injected=False, float32_hyperparameters=False)
    rounding = abs((1.0 - float(np.float32(0.9999))) / 1e-4 - 1.0)
    assert 1e-4 < _max_relative_difference(state_inj, state) <= 1.01 * rounding


# ---------------------------------------------------------------------------------------------
# optax.tree utilities on came's state
# ---------------------------------------------------------------------------------------------

STAT_FIELDS = ("mu", "v_row", "v_col", "v", "r_row", "r_col")


def _params():
    key_w, key_b = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(key_w, (4, 3)), "b": jax.random.normal(key_b, (3,))}


def _grads(step):
    key_w, key_b = jax.random.split(jax.random.key(step + 1))
    return {"w": jax.random.normal(key_w, (4, 3)), "b": jax.random.normal(key_b, (3,))}


def _steps(update, params, state, first, count):
    """``count`` steps of a jitted ``update`` with the gradients of steps ``first, ...``."""
    for t in range(first, first + count):
        updates, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_map_params_maps_every_parameter_shaped_field():
    """``optax.tree.map_params`` with a spec tree reaches mu and all five statistics; the
    count goes to ``transform_non_params``."""
    tx = came_optax.came(1e-2)
    specs = {"w": "kernel", "b": "bias"}
    mapped = optax.tree.map_params(
        tx, lambda _, spec: spec, tx.init(_params()), specs, transform_non_params=lambda _: None
    )
    assert mapped[0].count is None
    for field in STAT_FIELDS:
        assert getattr(mapped[0], field) == specs, field


@pytest.mark.parametrize("debias", [False, True])
def test_map_params_reset_equals_a_fresh_state_at_the_same_count(debias):
    """Zeroing every params-shaped tree with ``map_params`` leaves only the count: the next
    steps equal those from ``init`` with the count moved there by ``optax.tree.set``."""
    tx = came_optax.came(1e-2, debias=debias)
    update = jax.jit(tx.update)
    params, state = _steps(update, _params(), tx.init(_params()), 0, 3)
    reset = optax.tree.map_params(tx, jnp.zeros_like, state)
    fresh = optax.tree.set(tx.init(params), count=optax.tree.get(state, "count"))
    from_reset = _steps(update, params, reset, 3, 2)
    from_fresh = _steps(update, params, fresh, 3, 2)
    jax.tree.map(np.testing.assert_array_equal, from_reset, from_fresh)


def test_tree_get_reads_the_momentum_and_count_of_the_reference():
    """After three steps, ``optax.tree.get`` finds the count 3 and the float64 oracle's mu."""
    tx = came_optax.came(1e-2, weight_decay=0.1)
    _, state = _steps(jax.jit(tx.update), _params(), tx.init(_params()), 0, 3)
    ref_params = {k: np.asarray(v, np.float64) for k, v in _params().items()}
    ref_state = init_state(ref_params)
    for t in range(3):
        ref_params, ref_state, _ = came_step(
            ref_params, _grads(t), ref_state, count=t + 1, learning_rate=1e-2, weight_decay=0.1
        )
    assert int(optax.tree.get(state, "count")) == 3
    for name, mu in optax.tree.get(state, "mu").items():
        np.testing.assert_allclose(mu, ref_state[name]["mu"], rtol=1e-5, atol=1e-7)


def test_tree_set_of_mu_and_count_steps_like_the_reference():
    """A momentum and a count written with ``optax.tree.set`` are the ones the next debiased
    step uses: it matches the float64 oracle started from that momentum at that count."""
    tx = came_optax.came(1e-2, debias=True)
    params = _params()
    mu = jax.tree.map(lambda g: 0.5 * g, _grads(10))
    state = optax.tree.set(tx.init(params), mu=mu, count=jnp.asarray(7, jnp.int32))
    new_params, _ = _steps(jax.jit(tx.update), params, state, 0, 1)
    ref_state = init_state(params)
    for name in ref_state:
        ref_state[name]["mu"] = np.asarray(mu[name], np.float64)
    ref_params, _, _ = came_step(
        params, _grads(0), ref_state, count=8, learning_rate=1e-2, debias=True
    )
    assert_close_to_movement(new_params, ref_params, params, tol=1e-5)


# ---------------------------------------------------------------------------------------------
# complex parameters
# ---------------------------------------------------------------------------------------------
#
# CAME's statistics of a complex leaf are built from |g|^2, pooled per complex coordinate, as
# optax.adam's are. The update of z = x + iy is therefore not that of the real reformulation
# (x, y) as two real leaves, which keeps separate statistics for x and y. Two identities hold
# exactly (up to rounding) and are tested: the second-moment statistics of z are the sums of
# those of x and y (they are linear in |g|^2), and a complex leaf whose gradients keep a fixed
# phase per coordinate, g_t = exp(i phi) r_t with real r_t, moves exactly like the real leaf
# fed r_t, rotated by exp(i phi) (every statistic sees only |g|^2 and |u - m|^2). CAME works
# leaf by leaf, so each test runs its real and complex leaves side by side in one tree.

SHAPES = {"w": (4, 3), "b": (5,)}
STEPS = 20


def _random(rng, shape, complex_=False):
    x = rng.normal(size=shape)
    return x + 1j * rng.normal(size=shape) if complex_ else x


def _trajectory(tx, params, grads):
    """Scans ``tx`` over stacked ``grads``; returns the final state and the updates per step."""

    def step(carry, g):
        p, s = carry
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), updates

    (_, state), updates = jax.jit(lambda p, gs: jax.lax.scan(step, (p, tx.init(p)), gs))(
        params, grads
    )
    return state[0], updates


@with_configs
def test_complex_parabola_with_matrices_converges(opt_kwargs):
    """A complex64 parabola over a factored (4, 3) and an unfactored (3,) leaf reaches its
    minimum within optax's 3e-2 in 2000 steps (optax's parabola has only a vector)."""
    rng = np.random.default_rng(0)
    target = {"w": _random(rng, (4, 3), True), "b": _random(rng, (3,), True)}
    target = jax.tree.map(lambda x: jnp.asarray(x, jnp.complex64), target)
    loss = lambda p: sum(jnp.sum(jnp.abs(p[k] - target[k]) ** 2) for k in p)
    tx = came_optax.came(**opt_kwargs)

    def step(carry, _):
        p, s = carry
        grads = jax.tree.map(jnp.conj, jax.grad(loss)(p))
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    params = jax.tree.map(jnp.zeros_like, target)
    (final, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=2000))(
        (params, tx.init(params))
    )
    for name in target:
        assert final[name].dtype == jnp.complex64
        np.testing.assert_allclose(final[name], target[name], rtol=3e-2, atol=3e-2)


@with_configs
def test_second_moment_statistics_add_over_real_and_imaginary_parts(opt_kwargs):
    """v_row, v_col and v of a complex leaf fed x + iy equal the sums of those of real leaves
    fed x and y (eps1 = 1e-30 counts twice in the sum, below float32 resolution)."""
    rng = np.random.default_rng(1)
    gx = {k: _random(rng, (STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    gy = {k: _random(rng, (STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    gz = {k: (gx[k] + 1j * gy[k]).astype(np.complex64) for k in SHAPES}
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    params = {"x": zeros, "y": zeros, "z": jax.tree.map(lambda x: x.astype(np.complex64), zeros)}
    state, _ = _trajectory(came_optax.came(**opt_kwargs), params, {"x": gx, "y": gy, "z": gz})
    for field in ("v_row", "v_col", "v"):
        stats = getattr(state, field)
        summed = jax.tree.map(jnp.add, stats["x"], stats["y"])
        assert _max_relative_difference(stats["z"], summed) <= 1e-6, field


@pytest.mark.parametrize("debias", [False, True])
def test_complex_leaf_with_fixed_phases_is_the_rotated_real_leaf(debias):
    """Gradients exp(i phi) r_t give updates exp(i phi) times those of the real leaf fed r_t,
    the same statistics and the rotated momentum (clip and weight decay active)."""
    rng = np.random.default_rng(2)
    phase = {k: np.exp(1j * rng.uniform(0, 2 * np.pi, s)) for k, s in SHAPES.items()}
    rotate = lambda tree: {k: (tree[k] * phase[k]).astype(np.complex64) for k in tree}
    r = {k: _random(rng, (STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    p0 = {k: _random(rng, s).astype(np.float32) for k, s in SHAPES.items()}
    tx = came_optax.came(1e-2, weight_decay=0.1, debias=debias)
    state, updates = _trajectory(
        tx, {"real": p0, "complex": rotate(p0)}, {"real": r, "complex": rotate(r)}
    )
    for name in SHAPES:
        expected = updates["real"][name] * phase[name]
        error = np.max(np.abs(updates["complex"][name] - expected))
        assert error <= 1e-5 * np.max(np.abs(expected)), name
    for field in STAT_FIELDS[1:]:
        stats = getattr(state, field)
        assert jax.tree.map(jnp.result_type, stats["complex"]) == jax.tree.map(
            jnp.result_type, stats["real"]
        )
        assert _max_relative_difference(stats["complex"], stats["real"]) <= 1e-6, field
    for name, mu in state.mu["complex"].items():
        expected = state.mu["real"][name] * phase[name]
        assert np.max(np.abs(mu - expected)) <= 1e-6 * np.max(np.abs(expected)), name


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    # jax < 0.8 has no jax.enable_x64; its context manager lived in jax.experimental.
    from jax.experimental import enable_x64

    return enable_x64()


@pytest.mark.parametrize("debias", [False, True])
def test_64_bit_leaves_keep_64_bit_statistics_and_arithmetic(debias):
    """float64 and complex128 leaves keep float64 statistics and a momentum of their dtype, and
    follow the float64 NumPy oracle to 1e-10 of their movement (float32 arithmetic anywhere
    would show at ~1e-7). The complex leaves' gradients have fixed phases, as above."""
    rng = np.random.default_rng(3)
    phase = {k: np.exp(1j * rng.uniform(0, 2 * np.pi, s)) for k, s in SHAPES.items()}
    r = {k: _random(rng, (STEPS, *s)) for k, s in SHAPES.items()}
    p0 = {k: _random(rng, s) for k, s in SHAPES.items()}
    kwargs = dict(learning_rate=1e-2, weight_decay=0.1, debias=debias)
    expected = came_numpy(p0, [{k: r[k][t] for k in r} for t in range(STEPS)], **kwargs)
    rotate = lambda tree: {k: tree[k] * phase[k] for k in tree}
    with _x64():
        state, updates = _trajectory(
            came_optax.came(**kwargs),
            {"float64": p0, "complex128": rotate(p0)},
            {"float64": r, "complex128": rotate(r)},
        )
    for dtype, turn in (("float64", 1.0), ("complex128", phase)):
        for name in SHAPES:
            rotation = turn if dtype == "float64" else turn[name]
            assert state.mu[dtype][name].dtype == dtype
            assert updates[dtype][name].dtype == dtype
            for field in STAT_FIELDS[1:]:
                assert getattr(state, field)[dtype][name].dtype == jnp.float64, (field, name)
            start = p0[name] * rotation
            path = start + np.cumsum(np.asarray(updates[dtype][name]), axis=0)
            oracle = np.stack([step[name] for step in expected]) * rotation
            moved = np.max(np.abs(oracle[-1] - start))
            assert np.max(np.abs(path - oracle)) <= 1e-10 * moved, (dtype, name)
