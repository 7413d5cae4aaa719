"""came() behaves like any other optax optimizer."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close_to_movement
from reference_numpy import came_numpy

import came_optax


def _params():
    return {
        "scalar": jnp.array(0.5, jnp.float32),
        "bias": jnp.linspace(-1.0, 1.0, 5),
        "kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
        "conv": jnp.linspace(-1.0, 1.0, 2 * 2 * 3 * 4).reshape(2, 2, 3, 4),
    }


def _grads(seed=0, params=None):
    params = _params() if params is None else params
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def _run(tx, steps=5, params=None, jit=True, **extra):
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for t in range(steps):
        updates, state = update(_grads(t, params), state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


def _minimise(loss, params, tx, steps):
    def body(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params


@pytest.mark.parametrize("debias", [False, True])
def test_converges_on_parabola(debias):
    target = jnp.array([[1.0, -1.0, 2.0], [0.5, 3.0, -2.0]])
    loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)
    init = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    final = _minimise(loss, init, came_optax.came(3e-2, debias=debias), 2000)
    chex.assert_trees_all_close(final, {"w": target, "b": jnp.ones(3)}, atol=1e-3)


@pytest.mark.parametrize("debias", [False, True])
def test_converges_on_rosenbrock(debias):
    loss = lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2
    final = _minimise(loss, jnp.array([-1.0, 1.0]), came_optax.came(3e-3, debias=debias), 10000)
    np.testing.assert_allclose(final, [1.0, 1.0], atol=1e-3)


def test_jit_compiles_once_across_steps():
    tx = came_optax.came(optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1)
    params = _params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(4):
        params, state = step(params, state, _grads(t))
    assert step._cache_size() == 1


def test_state_is_a_namedtuple_pytree_and_eval_shape_works():
    tx = came_optax.came(1e-3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
    shapes = jax.eval_shape(tx.init, abstract)
    concrete = tx.init(_params())
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete)
    came = shapes[0]
    assert isinstance(came, came_optax.ScaleByCameState)
    assert came.v_row["kernel"].shape == (4,)
    assert came.v_col["kernel"].shape == (3,)
    assert came.v["kernel"].shape == (1,)  # a placeholder: the kernel is factored
    assert came.v["bias"].shape == (5,)
    assert came.r_row["conv"].shape == (2, 2, 3)
    assert came.mu["conv"].shape == (2, 2, 3, 4)


def test_bf16_params_get_bf16_updates_with_float32_state():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    tx = came_optax.came(1e-3, weight_decay=0.1)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(_grads(0, params), state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    state_dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim > 0}
    assert state_dtypes == {jnp.dtype(jnp.float32)}


def test_bf16_updates_match_float32_math():
    params32 = _params()
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    grads16 = _grads(0, params16)
    grads32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads16)
    tx = came_optax.came(1e-2)
    u16, _ = tx.update(grads16, tx.init(params16), params16)
    u32, _ = tx.update(grads32, tx.init(params32), params32)
    expected = jax.tree.map(lambda u: u.astype(jnp.bfloat16), u32)
    chex.assert_trees_all_equal(u16, expected)


def test_mu_dtype_bfloat16_stores_momentum_in_bfloat16():
    tx = came_optax.came(1e-3, mu_dtype=jnp.bfloat16)
    _, state = _run(tx, steps=2)
    mu = state[0].mu
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}


def _came_hparams(**kw):
    base = dict(b1=0.8, b2=0.99, b3=0.999, clip_threshold=0.5, weight_decay=0.05)
    base.update(kw)
    return base


def test_inject_hyperparams_matches_plain_came():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6, 1e-3)
    injected = optax.inject_hyperparams(came_optax.came)(schedule, **_came_hparams())
    plain = came_optax.came(schedule, **_came_hparams())
    p_inj, _ = _run(injected, steps=6)
    p_plain, _ = _run(plain, steps=6)
    # Injected values are float32 arrays, plain ones Python floats: rounding differs.
    assert_close_to_movement(p_inj, p_plain, _params(), tol=1e-5)


@pytest.mark.parametrize(
    "name, value",
    [("b1", 0.5), ("b2", 0.9), ("b3", 0.99), ("weight_decay", 0.3), ("clip_threshold", 0.1)],
)
def test_injected_hyperparams_can_be_changed_between_steps(name, value):
    tx = optax.inject_hyperparams(came_optax.came)(1e-2, **_came_hparams())
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(_grads(0), state, params)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    updates, _ = update(_grads(1), state, params)
    assert update._cache_size() == 1

    # The same two steps with the hyperparameter changed by hand.
    first = came_optax.came(1e-2, **_came_hparams())
    second = came_optax.came(1e-2, **_came_hparams(**{name: value}))
    _, s = first.update(_grads(0), first.init(params), params)
    expected, _ = second.update(_grads(1), s, params)
    zero = jax.tree.map(jnp.zeros_like, expected)
    assert_close_to_movement(updates, expected, zero, tol=1e-4)


def _decay_matrices(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def test_callable_mask_works_with_static_args_under_inject_hyperparams():
    kw = dict(weight_decay=0.5, mask=_decay_matrices)
    injected = optax.inject_hyperparams(came_optax.came, static_args=("mask",))(1e-2, **kw)
    p_inj, _ = _run(injected, steps=3)
    p_plain, _ = _run(came_optax.came(1e-2, **kw), steps=3)
    p_nodecay, _ = _run(came_optax.came(1e-2, weight_decay=0.0), steps=3)
    # Injected b3 = 0.9999 is a float32 array, so 1 - b3 carries a relative rounding
    # error of ~6e-4 that a Python float does not: hence the looser tolerance.
    assert_close_to_movement(p_inj, p_plain, _params(), tol=1e-3)
    # The mask is honoured: vectors are not decayed, matrices are.
    chex.assert_trees_all_close(p_plain["bias"], p_nodecay["bias"], rtol=1e-6)
    assert not np.allclose(p_plain["kernel"], p_nodecay["kernel"], rtol=1e-4)


def test_callable_mask_without_static_args_is_not_silently_dropped():
    tx = optax.inject_hyperparams(came_optax.came)(1e-2, weight_decay=0.5, mask=_decay_matrices)
    with pytest.raises(ValueError, match="static_args=\\('mask',\\)"):
        tx.init(_params())


def test_mu_dtype_under_inject_hyperparams():
    ok = optax.inject_hyperparams(came_optax.came)(1e-2, mu_dtype="bfloat16")
    _, state = _run(ok, steps=1)
    assert state.inner_state[0].mu["kernel"].dtype == jnp.bfloat16
    bad = optax.inject_hyperparams(came_optax.came)(1e-2, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="mu_dtype"):
        bad.init(_params())


def test_inject_hyperparams_with_bf16_params_needs_float32_hyperparams():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    tx = optax.inject_hyperparams(came_optax.came, hyperparam_dtype=jnp.float32)(1e-2)
    state = tx.init(params)
    assert state.hyperparams["b3"].dtype == jnp.float32
    assert float(state.hyperparams["b3"]) == pytest.approx(0.9999)
    updates, _ = tx.update(_grads(0, params), state, params)
    plain = came_optax.came(1e-2)
    expected, _ = plain.update(_grads(0, params), plain.init(params), params)
    # Two bfloat16 ulps: the float32 1 - b3 is 1.7e-4 away from Python's 1e-4.
    chex.assert_trees_all_close(updates, expected, rtol=8e-3, atol=0)


def test_multi_steps_accumulates_then_applies_came():
    k = 3
    tx = optax.MultiSteps(came_optax.came(1e-2), every_k_schedule=k)
    params = _params()
    state = tx.init(params)
    grads = [_grads(t) for t in range(k)]
    for t, g in enumerate(grads):
        updates, state = tx.update(g, state, params)
        if t < k - 1:
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    plain = came_optax.came(1e-2)
    expected, _ = plain.update(mean, plain.init(params), params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)


def test_partition_and_masked_compose():
    labels = {"scalar": "sgd", "bias": "sgd", "kernel": "came", "conv": "came"}
    tx = optax.partition({"came": came_optax.came(1e-2), "sgd": optax.sgd(1e-2)}, labels)
    p_part, _ = _run(tx, steps=3)
    p_came, _ = _run(came_optax.came(1e-2), steps=3)
    # Matrices follow CAME exactly; vectors follow SGD.
    chex.assert_trees_all_close(p_part["kernel"], p_came["kernel"], rtol=1e-6)
    chex.assert_trees_all_close(p_part["conv"], p_came["conv"], rtol=1e-6)

    masked = optax.masked(came_optax.came(1e-2), _decay_matrices)
    p_masked, _ = _run(masked, steps=3)
    chex.assert_trees_all_close(p_masked["kernel"], p_came["kernel"], rtol=1e-6)
    # optax.masked passes the other leaves' gradients through unchanged.
    raw = _params()["bias"] + sum(_grads(t)["bias"] for t in range(3))
    chex.assert_trees_all_close(p_masked["bias"], raw, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(b1=1.5), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.01), "b2"),
        (dict(b3=-1.0), "b3"),
        (dict(b2=1.0), "b2"),  # the estimate would stay zero: NaN updates
        (dict(b3=1.0), "b3"),
        (dict(b3=float("nan")), "b3"),
        (dict(eps1=-1e-30), "eps1"),
        (dict(eps2=-1.0), "eps2"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=-1.0), "clip_threshold"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=np.float32(-1.0)), "learning_rate"),
        (dict(min_dim_size_to_factor=0), "min_dim_size_to_factor"),
        (dict(min_dim_size_to_factor=2.5), "min_dim_size_to_factor"),
        (dict(factored_dims="first_two"), "factored_dims"),
        (dict(mu_dtype=jnp.int32), "mu_dtype"),
        (dict(mask=True), "mask"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, name):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        came_optax.came(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learning_rate=0.0),
        dict(b1=1.0, weight_decay=0.1),  # the momentum stays zero: decay alone moves
        dict(b2=0.0, b3=0.0),
        dict(eps1=0.0, eps2=0.0),
        dict(clip_threshold=None),
    ],
    ids=["lr_0", "b1_1", "b2_b3_0", "eps_0", "no_clip"],
)
def test_edge_hyperparameters_follow_the_reference(kwargs):
    # Valid edge values (the ends of each range, and zeros a falsy check would replace)
    # must be used as given: four steps against the float64 transcription.
    kwargs = {"learning_rate": 1e-2, **kwargs}
    params = _params()
    final, _ = _run(came_optax.came(**kwargs), steps=4)
    to_numpy = lambda tree: {k: np.asarray(v) for k, v in tree.items()}
    expected = came_numpy(
        to_numpy(params), [to_numpy(_grads(t, params)) for t in range(4)], **kwargs
    )[-1]
    for k in params:
        np.testing.assert_allclose(final[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_traced_hyperparameters_skip_validation_and_reach_the_math():
    # Inside jit every hyperparameter is a tracer, which construction cannot range-check;
    # the traced run must still equal the run with the same concrete values.
    params = {k: _params()[k] for k in ("bias", "kernel")}
    hparams = dict(
        learning_rate=3e-3, b1=0.5, b2=0.9, b3=0.99, eps1=1e-20, eps2=1e-12,
        clip_threshold=0.5, weight_decay=0.1,
    )  # fmt: skip
    hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}

    def train(hp):
        return _run(came_optax.came(**hp), steps=2, params=params)[0]

    assert_close_to_movement(jax.jit(train)(hparams), train(hparams), params, tol=1e-5)
    with pytest.raises(ValueError, match="b1"):
        train({**hparams, "b1": jnp.asarray(1.5)})
    jax.jit(train)({**hparams, "b1": jnp.asarray(1.5)})  # traced: not checked


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_leaves_raise(dtype):
    tx = came_optax.came(1e-3)
    with pytest.raises(TypeError, match="floating-point"):
        tx.init({"w": jnp.ones((2, 2), dtype)})


def test_complex_momentum_in_a_real_mu_dtype_raises_naming_the_leaf():
    tx = came_optax.came(1e-3, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\['w'\]"):
        tx.init({"w": jnp.ones((2, 2), jnp.complex64), "b": jnp.ones(2)})


def test_integer_gradients_raise():
    tx = came_optax.came(1e-3)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"came: update \['w'\] has dtype int32"):
        tx.update({"w": jnp.ones((2, 2), jnp.int32)}, tx.init(params), params)


@pytest.mark.parametrize(
    "grads",
    [
        {"w": jnp.ones((2, 3))},  # a leaf missing
        {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "extra": jnp.ones(1)},  # one too many
        {"w": jnp.ones((3, 2)), "b": jnp.ones(3)},  # transposed
        {"w": jnp.ones((2, 3)), "b": jnp.ones(4)},  # wrong vector length
    ],
)
def test_mismatched_gradient_tree_raises(grads):
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    tx = came_optax.came(1e-3)
    with pytest.raises(ValueError, match="^came: .*tree structure"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
    "bad, leaf", [({"w": (3, 2), "b": (3,)}, "['w']"), ({"w": (2, 3), "b": (4,)}, "['b']")]
)
def test_mismatched_shape_error_names_the_leaf_by_key_path(bad, leaf):
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    tx = came_optax.came(1e-3)
    grads = {k: jnp.ones(v) for k, v in bad.items()}
    with pytest.raises(ValueError, match=f"^came: the update {re.escape(leaf)} has shape"):
        tx.update(grads, tx.init(params), params)


def test_gradients_as_a_list_for_dict_params_are_reported_by_came():
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    tx = came_optax.came(1e-3)
    with pytest.raises(ValueError, match="^came: the updates' tree structure"):
        tx.update([jnp.ones(3), jnp.ones((2, 3))], tx.init(params), params)


def test_learning_rate_none_raises():
    with pytest.raises(ValueError, match="learning_rate must be"):
        came_optax.came(None)


def test_update_without_params_raises_a_clear_error():
    params = {"w": jnp.ones((2, 3))}
    tx = came_optax.came(1e-3)
    with pytest.raises(ValueError, match="came: update needs the parameters"):
        tx.update(params, tx.init(params))


def test_weight_decay_is_decoupled_and_scaled_by_learning_rate():
    lr, wd = 1e-2, 0.1
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = came_optax.came(lr, weight_decay=wd)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients give zero CAME updates, leaving only -lr * wd * p.
    chex.assert_trees_all_close(updates, jax.tree.map(lambda p: -lr * wd * p, params), rtol=1e-6)


@pytest.mark.parametrize("debias", [False, True])
def test_first_step_update_rms(debias):
    lr = 1e-3
    params = {"w": jnp.zeros((64, 32))}
    grads = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    tx = came_optax.came(lr, debias=debias)
    updates, _ = tx.update(grads, tx.init(params), params)
    rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2))) / lr
    if debias:
        assert 0.8 < rms < 1.5  # Adam-like: about the learning rate
    else:
        assert 9.0 < rms < 13.0  # the reference: about 11x the learning rate


def test_cast_to_param_dtype_without_params_is_identity():
    tx = came_optax.cast_to_param_dtype()
    updates = {"w": jnp.ones(2)}
    out, _ = tx.update(updates, tx.init(updates))
    chex.assert_trees_all_equal(out, updates)
