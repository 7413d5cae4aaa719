"""Writes an optimizer state saved by came_optax 0.1.0, for the layout-upgrade tests.

0.1.0 kept ``came()``'s state as ``(FactoredRmsState, clip state, ConfidenceState,
(decay, learning rate, cast))`` with per-leaf tuples for the statistics (None where a
leaf keeps no statistic). This script must run against that version's package::

    mkdir -p /tmp/came_optax_0_1_0
    git archive 0af1fbe came_optax | tar -x -C /tmp/came_optax_0_1_0
    PYTHONPATH=/tmp/came_optax_0_1_0 python tests/golden/make_state_0_1_0.py

Output: the orbax (``StandardCheckpointer``) checkpoint ``tests/golden/came_optax_0_1_0_state``,
a dict with these entries:

``params0``
    float32 parameters before the first step: a matrix, a vector, a conv kernel, a scalar.
``grads``
    a list of ``STEPS + 1`` float32 gradient trees drawn with NumPy (not from a loss), so
    any version can replay exactly the same inputs: the first ``STEPS`` were applied, the
    last one is the next step's.
``params``, ``opt_state``, ``next_updates``
    for ``came(LEARNING_RATE, weight_decay=WEIGHT_DECAY)``: the parameters and the
    optimizer state after ``STEPS`` updates, and the update for the last gradient.
``injected_params``, ``injected_opt_state``, ``injected_next_updates``
    the same for ``optax.inject_hyperparams(came)(learning_rate=LEARNING_RATE,
    weight_decay=WEIGHT_DECAY, mu_dtype='bfloat16')``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import came_optax

OUT = Path(__file__).resolve().parent / "came_optax_0_1_0_state"
STEPS, LEARNING_RATE, WEIGHT_DECAY = 3, 1e-2, 1e-2
SHAPES = {"dense": {"kernel": (6, 4), "bias": (4,)}, "conv": (3, 3, 2, 4), "scale": ()}


def _tree(rng: np.random.Generator, scale: float) -> dict:
    return jax.tree.map(
        lambda shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def main() -> None:
    assert came_optax.__version__ == "0.1.0" and hasattr(came_optax, "FactoredRmsState"), (
        "run this against came_optax 0.1.0 (see the module docstring)"
    )
    rng = np.random.default_rng(2023)
    params0 = _tree(rng, 0.5)
    grads = [_tree(rng, 0.1 * (t + 1)) for t in range(STEPS + 1)]
    out = {"params0": params0, "grads": grads}
    for prefix, tx in {
        "": came_optax.came(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
        "injected_": optax.inject_hyperparams(came_optax.came)(
            learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype="bfloat16"
        ),
    }.items():
        params, state = params0, tx.init(params0)
        for g in grads[:STEPS]:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        out[f"{prefix}params"] = params
        out[f"{prefix}opt_state"] = state
        out[f"{prefix}next_updates"] = tx.update(grads[STEPS], state, params)[0]
    shutil.rmtree(OUT, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(OUT, out)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
