"""came() equals the explicit chain of its stages, on every option.

The stages' math lives once (``_factored``, ``_confidence``); ``scale_by_came`` runs it leaf
by leaf in one transformation. These tests compare parameters *and* every state value of
``came()`` with the chain of the public stages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close_to_movement

import came_optax

PARAMS = {
    "scalar": (),
    "bias": (5,),
    "kernel": (4, 3),
    "tall": (16, 2),
    "rank3": (3, 5, 6),
    "conv": (2, 2, 3, 4),
    # Large enough for an int8 momentum (4096 elements or more): 16x16 blocks, and a vector's.
    "big": (2, 48, 128),
    "long": (4096,),
}

CASES = {
    "reference": {},
    "debias": dict(debias=True),
    "no_clip": dict(clip_threshold=None),
    "tight_clip": dict(clip_threshold=0.3),
    "largest_two": dict(factored_dims="largest_two"),
    "min_dim": dict(min_dim_size_to_factor=4),
    "bf16_mu": dict(mu_dtype=jnp.bfloat16, debias=True),
    "int8_mu": dict(mu_dtype="int8", debias=True),
    "cautious": dict(cautious=True, debias=True, weight_decay=0.1),
    "hyperparams": dict(b1=0.8, b2=0.95, b3=0.99, eps1=1e-20, eps2=1e-12, weight_decay=0.1),
}


def _stages(
    lr,
    b1=0.9,
    b2=0.999,
    b3=0.9999,
    eps1=1e-30,
    eps2=1e-16,
    clip_threshold=1.0,
    weight_decay=0.0,
    mu_dtype=None,
    debias=False,
    cautious=False,
    stochastic_rounding=False,
    seed=0,
    **factoring,
):
    """The explicit chain that came() must equal: its three stages, then the tail."""
    clip = optax.identity() if clip_threshold is None else optax.clip_by_block_rms(clip_threshold)
    stages = optax.chain(
        came_optax.scale_by_factored_second_moment(b2, eps1, debias=debias, **factoring),
        clip,
        came_optax.scale_by_confidence(b1, b3, eps2, mu_dtype=mu_dtype, debias=debias, **factoring),
    )
    if stochastic_rounding:
        last = came_optax.stochastic_round_to_param_dtype(seed)
    else:
        last = came_optax.cast_to_param_dtype()
    return optax.chain(
        came_optax.cautious(stages) if cautious else stages,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
        last,
    )


def _params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(1), len(PARAMS))
    return {
        k: jax.random.normal(key, s, jnp.float32).astype(dtype)
        for key, (k, s) in zip(keys, PARAMS.items(), strict=True)
    }


def _grads(t, params, scale=1.0):
    keys = jax.random.split(jax.random.key(100 + t), len(params))
    return {
        k: (scale * jax.random.normal(key, p.shape, jnp.float32)).astype(p.dtype)
        for key, (k, p) in zip(keys, params.items(), strict=True)
    }


def _run(tx, params, steps=4, scales=None):
    state = tx.init(params)
    update = jax.jit(tx.update)
    start = params
    for t in range(steps):
        scale = 1.0 if scales is None else scales[t]
        updates, state = update(_grads(t, params, scale), state, params)
        params = optax.apply_updates(params, updates)
    return start, params, state


def _chain_fields(state):
    """The chain's statistics under the names of ScaleByCameState."""
    factored, _, confidence = state[0]
    assert int(factored.count) == int(confidence.count)
    return dict(
        count=factored.count,
        mu=confidence.mu,
        v_row=factored.v_row,
        v_col=factored.v_col,
        v=factored.v,
        r_row=confidence.r_row,
        r_col=confidence.r_col,
        mu_scale=confidence.mu_scale,
    )


def _assert_equivalent(came_run, chain_run, mu_dtype=None):
    start, p_came, s_came = came_run
    _, p_chain, s_chain = chain_run
    bf16 = [k for k in PARAMS if start[k].dtype == jnp.bfloat16]
    for k in bf16:
        # Updates equal to float32 rounding may still round to neighbouring bf16 values.
        a, b = (np.asarray(x[k], np.float64) for x in (p_came, p_chain))
        np.testing.assert_allclose(a, b, rtol=2**-8, err_msg=k)
    others = lambda tree: {k: tree[k] for k in PARAMS if k not in bf16}
    assert_close_to_movement(others(p_came), others(p_chain), others(start), tol=1e-5)
    expected = _chain_fields(s_chain)
    for field, tree in expected.items():
        got = getattr(s_came[0], field)
        assert jax.tree.structure(got) == jax.tree.structure(tree), field
        for path, a, b in zip(
            jax.tree_util.tree_leaves_with_path(got),
            jax.tree.leaves(got),
            jax.tree.leaves(tree),
            strict=True,
        ):
            assert a.shape == b.shape and a.dtype == b.dtype, (field, path[0])
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            # bf16 momentum may round one ulp apart where the float32 values differ by one.
            rtol = 2**-7 if (field == "mu" and mu_dtype is not None) else 2e-5
            np.testing.assert_allclose(
                a,
                b,
                rtol=rtol,
                atol=rtol * np.max(np.abs(b)),
                err_msg=f"{field}{jax.tree_util.keystr(path[0])}",
            )


@pytest.mark.parametrize("case", list(CASES))
def test_came_equals_the_chain_of_stages(case):
    kwargs = CASES[case]
    params = _params()
    came_run = _run(came_optax.came(1e-2, **kwargs), params)
    chain_run = _run(_stages(1e-2, **kwargs), params)
    _assert_equivalent(came_run, chain_run, kwargs.get("mu_dtype"))


def test_came_equals_the_chain_with_bf16_parameters_and_gradients():
    params = _params(jnp.bfloat16)
    came_run = _run(came_optax.came(1e-2, weight_decay=0.1), params)
    chain_run = _run(_stages(1e-2, weight_decay=0.1), params)
    _assert_equivalent(came_run, chain_run)


def test_came_equals_the_chain_with_stochastic_rounding():
    params = _params(jnp.bfloat16)
    kw = dict(weight_decay=0.1, stochastic_rounding=True, seed=7)
    came_run = _run(came_optax.came(1e-3, **kw), params)
    chain_run = _run(_stages(1e-3, **kw), params)
    _assert_equivalent(came_run, chain_run)
    # The same run with round-to-nearest ends elsewhere: the rounding is really stochastic.
    nearest = _run(came_optax.came(1e-3, weight_decay=0.1), params)[1]
    assert any(bool(jnp.any(nearest[k] != came_run[1][k])) for k in PARAMS)


def test_came_equals_the_chain_through_an_overflowing_step():
    # Step 2's gradients square to inf in float32: both saturate those squares.
    params = _params()
    scales = [1.0, 1e25, 1.0, 1.0]
    came_run = _run(came_optax.came(1e-2, debias=True), params, scales=scales)
    chain_run = _run(_stages(1e-2, debias=True), params, scales=scales)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(came_run[2]))
    _assert_equivalent(came_run, chain_run)


def test_injected_came_equals_the_chain_with_the_same_float32_hyperparameters():
    hp = dict(
        b1=0.8, b2=0.99, b3=0.999, eps1=1e-30, eps2=1e-16, clip_threshold=0.5, weight_decay=0.05
    )
    params = _params()
    came_run = _run(optax.inject_hyperparams(came_optax.came)(1e-2, **hp), params)
    as_float32 = {k: jnp.float32(v) for k, v in hp.items()}
    chain_run = _run(_stages(jnp.float32(1e-2), **as_float32), params)
    _, p_came, s_came = came_run
    _assert_equivalent((came_run[0], p_came, s_came.inner_state), chain_run)


def test_the_compiled_update_has_no_conditional():
    # A conditional costs a host round trip on GPUs: every leaf's step is straight-line code.
    params = _params()
    tx = came_optax.came(1e-2, debias=True)
    compiled = jax.jit(tx.update).lower(_grads(0, params), tx.init(params), params).compile()
    assert " conditional(" not in compiled.as_text()
