"""Many layers: stacked leaves with ``batch_dims`` and grouped leaves, against separate layers.

A model of ``LAYERS`` layers, each a ``(64, 128)`` kernel and an 8192-element vector (both large
enough for ``mu_dtype='int8'`` to quantize them), is trained for ``STEPS`` steps on the same
gradients in several layouts: its layers as separate leaves (the reference), stacked into one
``(layers, 64, 128)`` and one ``(layers, 8192)`` leaf with ``batch_dims=1``, the separate leaves
with ``group_leaves=True``, both at once, and stacked with ``batch_dims=0``, the reference's view
of a tensor, where the RMS clip and the cautious kept fraction span all layers and the stacked
vectors are factored as a matrix. Layer ``i``'s gradients are scaled by ``SCALES[i]``, 1e-3 to
100, so a quantity shared across layers would show.

Each cell is the largest deviation from the reference over the leaves measured: the max
``|delta|`` of a leaf's final parameters over the max distance the reference moved that leaf. The
same arithmetic reads 0, float32 rounding in another order about 1e-7; the contrast shows what a
clip, a kept fraction or a factoring shared by all layers does. All layouts run in this process on
this machine's default device.

Usage::

    python benchmarks/many_layers.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import came_optax

LAYERS, KERNEL, VECTOR, STEPS = 8, (64, 128), 8192, 6
SCALES = np.logspace(-3, 2, LAYERS)
OPTIONS = {
    "default": {},
    "debias, cautious": {"debias": True, "cautious": True},
    "int8 mu": {"mu_dtype": "int8"},
}
# Layouts compared with the separate per-leaf layers: whether the model is stacked, came's layout
# arguments, and the leaves each row measures ("all", or each kind on its own row).
LAYOUTS = {
    "stacked, batch_dims=1": (True, {"batch_dims": 1}, ("all",)),
    "separate, group_leaves=True": (False, {"group_leaves": True}, ("all",)),
    "stacked, batch_dims=1, group_leaves=True": (
        True, {"batch_dims": 1, "group_leaves": True}, ("all",)
    ),
    "stacked, batch_dims=0 (contrast)": (True, {}, ("kernel", "vector")),
}  # fmt: skip
BOUND = 1e-5


def separate(stacked: dict) -> dict:
    """The stacked model's layers as separate leaves."""
    return {name: list(leaf) for name, leaf in stacked.items()}


def train(tx: optax.GradientTransformation, params: dict, grads: list[dict]) -> dict:
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params


def deviation(actual: dict, reference: dict, start: dict, leaves: str) -> float:
    """The largest deviation of ``actual`` from ``reference`` over ``leaves`` ("all" or a name).

    Per leaf, max |actual - reference| over max |reference - start|, how far the reference moved:
    the repository tests' measure of "equal to float32 rounding", which float32 arithmetic in
    another order keeps tiny.
    """
    if leaves != "all":
        actual, reference, start = actual[leaves], reference[leaves], start[leaves]
    worst = 0.0
    for a, b, p0 in zip(*(jax.tree.leaves(t) for t in (actual, reference, start)), strict=True):
        a, b, p0 = (np.asarray(x, np.float64) for x in (a, b, p0))
        worst = max(worst, np.max(np.abs(a - b)) / max(np.max(np.abs(b - p0)), 1e-30))
    return float(worst)


def main() -> None:
    keys = jax.random.split(jax.random.key(0), STEPS + 2)
    shapes = {"kernel": (LAYERS, *KERNEL), "vector": (LAYERS, VECTOR)}
    start = {
        "kernel": 0.02 * jax.random.normal(keys[0], shapes["kernel"]),
        "vector": jnp.ones(shapes["vector"]),
    }
    scales = {
        n: jnp.asarray(SCALES, jnp.float32).reshape(-1, *[1] * (len(s) - 1))
        for n, s in shapes.items()
    }
    # A steady direction plus noise, so the momentum and the confidence have something to track.
    direction = {n: jax.random.normal(keys[1], s) for n, s in shapes.items()}
    grads = [
        {n: scales[n] * (direction[n] + jax.random.normal(k, s)) for n, s in shapes.items()}
        for k in keys[2:]
    ]
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {device.platform}: "
        f"{device.device_kind}; {LAYERS} layers of a {KERNEL} kernel and a ({VECTOR},) vector, "
        f"gradient scales {SCALES[0]:g} to {SCALES[-1]:g}, {STEPS} steps of came(1e-3)\n"
    )
    print("| layout vs separate per-leaf layers | leaves | " + " | ".join(OPTIONS) + " |")
    print("|---|---|" + "---:|" * len(OPTIONS))
    reference = {
        name: train(came_optax.came(1e-3, **options), separate(start), [separate(g) for g in grads])
        for name, options in OPTIONS.items()
    }
    worst = 0.0
    for layout, (stacked, layout_args, kinds) in LAYOUTS.items():
        finals = {}
        for name, options in OPTIONS.items():
            tx = came_optax.came(1e-3, **options, **layout_args)
            if stacked:
                finals[name] = separate(train(tx, start, grads))
            else:
                finals[name] = train(tx, separate(start), [separate(g) for g in grads])
        for kind in kinds:
            cells = [deviation(finals[n], reference[n], separate(start), kind) for n in OPTIONS]
            if kind == "all":
                worst = max(worst, *cells)
            row = " | ".join(f"{c:.1e}" for c in cells)
            print(f"| {layout} | {kind} | {row} |", flush=True)
    verdict = "met" if worst <= BOUND else "missed"
    print(f"\nBound <= {BOUND:g} on every layout but the contrast: {verdict} (worst {worst:.1e}).")


if __name__ == "__main__":
    main()
