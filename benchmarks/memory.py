"""Parameter and optimizer-state memory of CAME, AdamW and Adafactor, per device.

Nothing is allocated: the parameters are ``jax.ShapeDtypeStruct`` leaves placed on a mesh of
simulated CPU devices, each optimizer's state shapes come from ``jax.eval_shape(tx.init,
params)`` and its shardings from ``came_optax.state_shardings`` (what ``jax.jit(tx.init)``
gives, for CAME and for optax's optimizers alike). A leaf's bytes on one device are
``prod(sharding.shard_shape(shape)) * itemsize``; on the 8-device mesh the parameters are
sharded FSDP-style: each leaf's largest axis that 8 divides is split over the 8 devices, and a
leaf with no such axis is replicated. A state leaf follows its parameter (a row or column
statistic drops the averaged axis), except along a dimension the split does not divide (an
int8 block scale whose parameter's shard is not a whole number of blocks), which
``state_shardings`` replicates; a sharding that still did not divide its leaf would be counted
replicated, and the output would say so.
``optax.adafactor``'s factored statistics are vectors created with ``jnp.zeros``; they follow
their parameter's sharding where the propagation gives one and are replicated otherwise.

Prints three markdown tables: the state bytes of each optimizer with float32 parameters and
their ratio to ``optax.adamw``'s; parameter plus state bytes per parameter; and parameter plus
state bytes per device on 1 and on 8 devices (no gradients or activations: see
``benchmarks/fit_tpu.py`` for a whole training step).

Run from the repository root:

    python benchmarks/memory.py
"""

from __future__ import annotations

import math

import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import came_optax

# Config: the models, the (optimizer, parameter dtype) setups, the columns of the state table
# and the mesh sizes.
MODELS = {
    "GPT-2 small": _models.gpt2(768, 12),
    "GPT-2 medium": _models.gpt2(1024, 24),
    "ViT-B/16": _models.vit(768, 12),
    # Llama-3.2-1B's widths with full-width k/v and an untied head, and LLaMA-7B's.
    "LLaMA-style 1B": _models.llama(2048, 16, mlp=8192, vocab=128256),
    "LLaMA-style 7B": _models.llama(4096, 32, mlp=11008, vocab=32000),
}

SETUPS = {
    "adamw, fp32 params": (optax.adamw(1e-3), jnp.float32),
    "adafactor, fp32 params": (optax.adafactor(1e-3), jnp.float32),
    "came, fp32 params": (came_optax.came(1e-4), jnp.float32),
    "came bf16 mu, fp32 params": (came_optax.came(1e-4, mu_dtype=jnp.bfloat16), jnp.float32),
    "came int8 mu, fp32 params": (came_optax.came(1e-4, mu_dtype="int8"), jnp.float32),
    "came int8 mu, bf16 params + SR": (
        came_optax.came(1e-4, mu_dtype="int8", stochastic_rounding=True),
        jnp.bfloat16,
    ),
}

# The state table compares these setups' states (all with float32 parameters) to BASELINE's.
STATE_COLUMNS = {
    "came": "came, fp32 params",
    "came, bf16 mu": "came bf16 mu, fp32 params",
    "came, int8 mu": "came int8 mu, fp32 params",
    "adamw": "adamw, fp32 params",
    "adafactor": "adafactor, fp32 params",
}
BASELINE = "adamw, fp32 params"

DEVICES = (1, 8)
MESH_AXIS = "fsdp"


def mesh(devices: int) -> Mesh:
    """A one-axis mesh over the first ``devices`` devices."""
    available = jax.devices()
    if devices < 1 or devices > len(available):
        raise ValueError(
            f"devices must be between 1 and the {len(available)} devices JAX sees; got "
            f"{devices}. Simulate more CPU devices with jax.config.update('jax_num_cpu_devices', "
            f"{devices}) before JAX starts."
        )
    return Mesh(np.array(available[:devices]), (MESH_AXIS,))


def fsdp_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
    """The largest axis of ``shape`` that ``devices`` divides, over the mesh; else replicated."""
    divisible = [i for i, n in enumerate(shape) if n % devices == 0]
    if devices == 1 or not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: shape[i])
    return PartitionSpec(*(MESH_AXIS if i == axis else None for i in range(len(shape))))


def placed(shapes: dict, dtype, m: Mesh) -> dict:
    """``ShapeDtypeStruct`` parameters of ``dtype`` with FSDP shardings on ``m``."""
    devices = m.devices.size
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(m, fsdp_spec(s, devices))),
        shapes,
        is_leaf=_models.is_shape,
    )


def leaf_bytes(x: jax.ShapeDtypeStruct, sharding: NamedSharding) -> tuple[int, bool]:
    """Bytes of ``x`` on one device, and whether ``sharding`` had to be dropped for it."""
    try:
        return math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize, False
    except ValueError:  # the sharding does not divide the shape: the leaf is replicated
        return x.size * x.dtype.itemsize, True


def plan(tx: optax.GradientTransformation, shapes: dict, dtype, meshes: list[Mesh]) -> list[dict]:
    """Bytes of parameters and optimizer state on one device of each mesh in ``meshes``.

    Returns, per mesh, ``params`` and ``state`` (bytes on one device; every device holds the
    same), and ``replicated``: the bytes of state leaves counted replicated because their
    sharding does not divide them.
    """
    state = jax.tree.leaves(jax.eval_shape(tx.init, _models.abstract(shapes, dtype)))
    out = []
    for m in meshes:
        params = placed(shapes, dtype, m)
        if m.devices.size == 1:  # every leaf is whole on the only device
            shardings = [NamedSharding(m, PartitionSpec())] * len(state)
        else:
            shardings = jax.tree.leaves(came_optax.state_shardings(tx, params))
        sizes = {"params": 0, "state": 0, "replicated": 0}
        for p in jax.tree.leaves(params):
            sizes["params"] += leaf_bytes(p, p.sharding)[0]
        for x, s in zip(state, shardings, strict=True):
            n, dropped = leaf_bytes(x, s)
            sizes["state"] += n
            sizes["replicated"] += n if dropped else 0
        out.append(sizes)
    return out


def fmt(n: int) -> str:
    """GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def main() -> None:
    # Simulated CPU devices for the 8-device mesh; nothing runs on them.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(DEVICES))
    meshes = [mesh(n) for n in DEVICES]
    plans = {
        (model, setup): dict(zip(DEVICES, plan(tx, shapes, dtype, meshes), strict=True))
        for model, shapes in MODELS.items()
        for setup, (tx, dtype) in SETUPS.items()
    }

    print("| model | params | " + " | ".join(STATE_COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(STATE_COLUMNS))
    for model, shapes in MODELS.items():
        base = plans[model, BASELINE][1]["state"]
        cells = [
            f"{fmt(n)} ({n / base:.3f}x)"
            for n in (plans[model, s][1]["state"] for s in STATE_COLUMNS.values())
        ]
        count = _models.num_params(shapes)
        print(f"| {model} | {count / 1e6:,.1f}M | " + " | ".join(cells) + " |")
    print(f"\nState bytes (float32 parameters), with the ratio to {BASELINE.split(',')[0]}'s.\n")

    names = list(SETUPS)
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for model, shapes in MODELS.items():
        count = _models.num_params(shapes)
        totals = [plans[model, s][1]["params"] + plans[model, s][1]["state"] for s in names]
        print(f"| {model} | " + " | ".join(f"{n / count:.2f} B" for n in totals) + " |")
    print("\nParameter plus optimizer-state bytes per parameter (no gradients or activations).\n")

    print("| model | devices | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    replicated = 0
    for model in MODELS:
        for n in DEVICES:
            row = [plans[model, s][n] for s in names]
            replicated = max(replicated, *(r["replicated"] for r in row))
            cells = [fmt(r["params"] + r["state"]) for r in row]
            print(f"| {model} | {n} | " + " | ".join(cells) + " |")
    print(
        "\nParameter plus optimizer-state bytes per device. On 8 devices each parameter's "
        "largest axis that 8 divides is sharded (FSDP) and the state as "
        "came_optax.state_shardings derives it from the parameters' (replicating what an "
        "8-way split does not divide)."
        + (
            f" State leaves whose sharding does not divide them are counted replicated (at "
            f"most {replicated / 2**20:,.1f} MiB per device)."
            if replicated
            else ""
        )
    )


if __name__ == "__main__":
    main()
