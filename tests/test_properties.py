"""Property-based tests over random shapes, dtypes, gradient scales and hyperparameters.

For every drawn case: updates are finite and shaped and typed like the parameters, the
optimizer state keeps its tree structure, shapes and dtypes from step to step, and the
updates agree with the float64 NumPy transcription of the reference
(``tests/reference_numpy.py``). Hyperparameters are traced float32 arguments of one
jitted step, as under ``optax.inject_hyperparams``, so examples that share shapes share a
compilation; the reference gets the same float32-rounded values (``1 - b3`` for a float32
``b3 = 0.9999`` is 1.7e-4 away from ``1e-4``).

Excluded on purpose: ``b2 = 1`` or ``b3 = 1`` (the second moment or the instability stays
exactly zero: NaN from the first step), ``eps1 = 0`` or ``eps2 = 0`` (NaN on an all-zero
gradient row), and ``b1 < 0.1``. The instability divides by
``|u - m| = b1 |u - m_prev|``, so float32 rounding of ``u`` is amplified by ``1 / b1``:
about 1e-6 of the update at ``b1 = 0.1``, 1e-3 at ``1e-4``, and at ``b1 = 0`` the
instability is rounding noise against ``eps2``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_numpy import came_step, init_state

import came_optax

STEPS = 3
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
trees = st.lists(shapes, min_size=1, max_size=3).map(
    lambda ss: {f"p{i}": s for i, s in enumerate(ss)}
)
hyperparams = st.fixed_dictionaries(
    {
        "learning_rate": st.floats(1e-4, 1e-1),
        "b1": st.floats(0.1, 0.99),
        "b2": st.floats(0.0, 0.9999),
        "b3": st.floats(0.0, 0.99999),
        "eps1": st.sampled_from([1e-30, 1e-20, 1e-8]),
        "eps2": st.sampled_from([1e-16, 1e-10, 1e-6]),
        "clip_threshold": st.none() | st.floats(0.1, 10.0),
        "weight_decay": st.floats(0.0, 0.5),
        "debias": st.booleans(),
    }
)
log10_scales = st.integers(-6, 6)
seeds = st.integers(0, 2**16)


def _came(hp: dict, **options):
    return came_optax.came(**hp, **options)


@functools.partial(jax.jit, static_argnames=("static",))
def _step(params, state, grads, numbers, static):
    """One jitted ``came`` update; ``numbers`` are traced, ``static`` is a sorted item tuple."""
    tx = _came({**numbers, **dict(static)})
    return tx.update(grads, state, params)


def _split(hp: dict, **options) -> tuple[dict, tuple]:
    """Traced numbers and hashable static options of one drawn configuration."""
    static = {"clip_threshold": None} if hp["clip_threshold"] is None else {}
    static.update(debias=hp["debias"], **options)
    numbers = {
        k: jnp.asarray(v, jnp.float32) for k, v in hp.items() if k not in static and k != "debias"
    }
    return numbers, tuple(sorted(static.items()))


def _draw_arrays(tree: dict, seed: int, scale: float, dtype) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in tree.items()}
    grads = [
        {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in tree.items()}
        for _ in range(STEPS)
    ]
    return params, grads


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@SETTINGS
@given(
    tree=trees,
    hp=hyperparams,
    log10_scale=log10_scales,
    seed=seeds,
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    mu_dtype=st.sampled_from([None, "bfloat16"]),
    factored_dims=st.sampled_from(["last_two", "largest_two"]),
    min_dim_size_to_factor=st.sampled_from([None, 1, 3]),
)
def test_updates_finite_and_state_layout_stable(
    tree, hp, log10_scale, seed, dtype, mu_dtype, factored_dims, min_dim_size_to_factor
):
    options = dict(
        mu_dtype=mu_dtype,
        factored_dims=factored_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
    )
    params, grads_seq = _draw_arrays(tree, seed, 10.0**log10_scale, dtype)
    state = _came(hp, **options).init(params)
    layout = _signature(state)
    numbers, static = _split(hp, **options)
    for grads in grads_seq:
        updates, state = _step(params, state, grads, numbers, static)
        assert _signature(state) == layout
        assert _signature(updates) == _signature(params)
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            assert jnp.all(jnp.isfinite(u)), jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(state):
            assert jnp.all(jnp.isfinite(x)), jax.tree_util.keystr(path)
        params = jax.tree.map(lambda p, u: p + u, params, updates)


@SETTINGS
@given(tree=trees, hp=hyperparams, log10_scale=log10_scales, seed=seeds)
def test_updates_match_the_float64_reference(tree, hp, log10_scale, seed):
    params, grads_seq = _draw_arrays(tree, seed, 10.0**log10_scale, jnp.float32)
    state = _came(hp).init(params)
    numbers, static = _split(hp)
    # The reference cannot average over empty axes; size-0 leaves are checked above.
    nonempty = [k for k, shape in tree.items() if 0 not in shape]
    reference_state = init_state({k: np.asarray(params[k]) for k in nonempty})
    for t, grads in enumerate(grads_seq):
        updates, state = _step(params, state, grads, numbers, static)
        p64 = {k: np.asarray(params[k], np.float64) for k in nonempty}
        new_p64, reference_state, _ = came_step(
            p64,
            {k: np.asarray(grads[k]) for k in nonempty},
            reference_state,
            count=t + 1,
            **{k: float(np.float32(v)) if k in numbers else v for k, v in hp.items()},
        )
        for k in nonempty:
            expected = new_p64[k] - p64[k]
            np.testing.assert_allclose(
                updates[k],
                expected,
                # Typically 1e-6; more where u is close to the old momentum, which makes
                # the instability (u - m)**2 ill-conditioned.
                rtol=1e-4,
                atol=1e-5 * np.max(np.abs(expected)),
                err_msg=f"leaf {k} {tree[k]}, step {t + 1}",
            )
        params = jax.tree.map(lambda p, u: p + u, params, updates)
