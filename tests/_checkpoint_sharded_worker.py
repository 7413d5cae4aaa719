"""Sharded CAME training on an 8-device CPU mesh, saved and resumed with orbax.

Run by ``tests/test_checkpoint.py`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before JAX starts::

    python tests/_checkpoint_sharded_worker.py save DIR    # train, save at step 6, go on to 10
    python tests/_checkpoint_sharded_worker.py resume DIR  # restore step 6, go on to 10

Each prints one JSON line whose ``digests`` (one SHA-256 per leaf of the final parameters
and optimizer state) must agree between the two modes. The optimizer state is placed
next to its parameters: the momentum like the parameter, a factored statistic like the
parameter without the averaged axis, counters replicated.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from helpers import leaf_digests
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import came_optax
from came_optax import state_shardings

TOTAL_STEPS, SAVE_STEP = 10, 6
SPECS = {
    "embed": P("data", "model"),
    "dense": {"kernel": P("model", "data"), "bias": P("data")},
    "conv": P(None, "data", "model"),
    "scale": P(),
}


def init_params(mesh) -> dict:
    rng = np.random.default_rng(0)
    params = {
        "embed": rng.standard_normal((16, 8)) / 4,
        "dense": {"kernel": rng.standard_normal((8, 12)) / 3, "bias": np.zeros(12)},
        "conv": rng.standard_normal((3, 8, 4)) / 2,
        "scale": np.ones(()),
    }
    return jax.tree.map(
        lambda p, spec: jax.device_put(p.astype(np.float32), NamedSharding(mesh, spec)),
        params,
        SPECS,
    )


def batch(step: int, mesh) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = np.sin(np.arange(32 * 12).reshape(32, 12) + step).astype(np.float32)
    sharding = NamedSharding(mesh, P("data", None))
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


def loss_fn(params, x, y):
    hidden = jnp.tanh(x @ params["embed"])
    pred = params["scale"] * (hidden @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((pred - y) ** 2) + 1e-2 * jnp.mean(jnp.square(params["conv"]))


def main(mode: str, directory: str) -> None:
    auto = jax.sharding.AxisType.Auto  # shardings propagate through jit as in most trainers
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
    tx = came_optax.came(1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16)
    params = init_params(mesh)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    opt_shardings = state_shardings(tx, params)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return jax.lax.with_sharding_constraint(
            (params, opt_state), (param_shardings, opt_shardings)
        )

    manager = ocp.CheckpointManager(directory)
    report = {"devices": jax.device_count()}
    if mode == "save":
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        for t in range(TOTAL_STEPS):
            params, opt_state = step(params, opt_state, *batch(t, mesh))
            if t + 1 == SAVE_STEP:
                manager.save(t + 1, args=ocp.args.StandardSave((params, opt_state)))
        sharded = [x for x in jax.tree.leaves(opt_state) if not x.sharding.is_fully_replicated]
        report["sharded_state_leaves"] = len(sharded)
    elif mode == "resume":
        abstract = jax.eval_shape(lambda: (params, tx.init(params)))
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            (param_shardings, opt_shardings),
        )
        start = manager.latest_step()
        params, opt_state = manager.restore(start, args=ocp.args.StandardRestore(target))
        report["restored_shardings_match"] = all(
            x.sharding == s
            for x, s in zip(
                jax.tree.leaves((params, opt_state)),
                jax.tree.leaves((param_shardings, opt_shardings)),
                strict=True,
            )
        )
        for t in range(start, TOTAL_STEPS):
            params, opt_state = step(params, opt_state, *batch(t, mesh))
    else:
        raise ValueError(f"mode must be 'save' or 'resume'; got {mode!r}")
    manager.wait_until_finished()
    manager.close()
    report["digests"] = leaf_digests((params, opt_state))
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
