"""Identical inputs give bitwise-identical params and state, run to run and process to process."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_bitwise_equal, run_python, tree_digest

import came_optax

CONFIGS = {
    "default": dict(learning_rate=1e-2),
    "everything": dict(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, 20),
        weight_decay=0.1,
        mu_dtype=jnp.bfloat16,
        debias=True,
        factored_dims="largest_two",
    ),
}


def _train(config: str, steps: int = 20):
    """A small jitted training run; returns the final params, optimizer state and losses."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 10)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 3)), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.standard_normal((10, 16)) / 3, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((16, 3)) / 4, jnp.bfloat16),
        "conv": jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32),
        "b": jnp.zeros(3, jnp.float32),
    }
    tx = came_optax.came(**CONFIGS[config])

    def loss_fn(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        pred = jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]
        return jnp.mean((pred - y) ** 2) + 1e-2 * jnp.mean(p["conv"] ** 2)

    def body(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, state), losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), length=steps))(
        params
    )
    return params, state, losses


@functools.cache
def _first_run(config: str):
    return _train(config)


def digest_of_run(config: str) -> str:
    """SHA-256 of every bit of a training run's params, optimizer state and losses."""
    return tree_digest(_first_run(config))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_recompiled_runs_are_bitwise_identical(config):
    first = _first_run(config)
    jax.clear_caches()  # the second run compiles afresh
    second = _train(config)
    assert_bitwise_equal(first, second)
    assert np.isfinite(np.asarray(first[2])).all()


def test_repeated_eager_updates_are_bitwise_identical():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "b": jnp.ones(5)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    tx = came_optax.came(1e-3, weight_decay=0.01)
    results = []
    for _ in range(2):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        results.append((updates, state))
    assert_bitwise_equal(*results)


@pytest.mark.slow
def test_a_fresh_process_reproduces_every_bit():
    code = "from tests.test_determinism import digest_of_run; print(digest_of_run('everything'))"
    result = run_python(["-c", code], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [digest_of_run("everything")]
