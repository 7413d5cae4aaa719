"""One process of the two-process CAME training run of ``tests/test_multihost.py``.

Usage::

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process gets 4 CPU devices; ``jax.distributed.initialize`` joins them into
one global mesh of ``NUM_PROCESSES * 4`` devices, shaped ``(data, model)`` with
``model`` = 4 inside a process and ``data`` across processes. CAME trains
``STEPS`` steps with FSDP and tensor-parallel shardings from
``came_optax._sharding.state_shardings``; process 0 writes the gathered
parameters to ``OUT.npz``. The model, data and loss are importable so the test
can train the same model on one device.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import came_optax
from came_optax import state_shardings

LOCAL_DEVICES = 4
STEPS = 5
SHAPES = {"w1": (16, 32), "b1": (32,), "w2": (32, 8)}
SPECS = {"w1": ("data", "model"), "b1": ("model",), "w2": ("model", "data")}


def init_params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        name: np.asarray(0.3 * jax.random.normal(key, shape))
        for (name, shape), key in zip(SHAPES.items(), keys, strict=True)
    }


def batches():
    kx, ky = jax.random.split(jax.random.key(1))
    return (
        np.asarray(jax.random.normal(kx, (STEPS, 16, 16))),
        np.asarray(jax.random.normal(ky, (STEPS, 16, 8))),
    )


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def make_tx():
    return came_optax.came(3e-3, weight_decay=1e-2)


def train(params, x, y, shardings=None, batch_sharding=None):
    """STEPS steps of CAME; with shardings, as one jitted program over the global mesh."""
    tx = make_tx()

    def step(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if shardings is None:
        init, step = jax.jit(tx.init), jax.jit(step)
    else:
        opt_shardings = state_shardings(tx, params, shardings)
        init = jax.jit(tx.init, out_shardings=opt_shardings)
        step = jax.jit(
            step,
            in_shardings=(shardings, opt_shardings, batch_sharding, batch_sharding),
            out_shardings=(shardings, opt_shardings),
            donate_argnums=(0, 1),
        )
    opt_state = init(params)
    for i in range(STEPS):
        params, opt_state = step(params, opt_state, x[i], y[i])
    return params, opt_state


def global_array(value, sharding):
    """A global array from a value every process holds; each places its own shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main(process_id, num_processes, port, out_path):
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == num_processes
    assert jax.local_device_count() == LOCAL_DEVICES
    mesh = jax.make_mesh(
        (num_processes, LOCAL_DEVICES), ("data", "model"), axis_types=(AxisType.Auto,) * 2
    )
    shardings = {name: NamedSharding(mesh, P(*SPECS[name])) for name in SHAPES}
    batch_sharding = NamedSharding(mesh, P("data"))
    params = {name: global_array(v, shardings[name]) for name, v in init_params().items()}
    x, y = batches()
    x, y = (global_array(v, NamedSharding(mesh, P(None, "data"))) for v in (x, y))
    with jax.set_mesh(mesh):
        params, opt_state = train(params, x, y, shardings, batch_sharding)
    # The state really is split across processes: no process holds all of a momentum.
    mu = opt_state[0].mu["w1"]
    assert not mu.is_fully_addressable and not mu.sharding.is_fully_replicated
    gathered = multihost_utils.process_allgather(params, tiled=True)
    if process_id == 0:
        np.savez(out_path, **{name: np.asarray(v) for name, v in gathered.items()})
    jax.distributed.shutdown()
    print(f"process {process_id}: {jax.device_count()} global devices, done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
