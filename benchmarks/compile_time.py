"""Compile time of one optimizer update against the number of parameter leaves.

An unscanned model keeps one leaf per weight of every block, so an optimizer that traces its
math leaf by leaf compiles a program that grows with the depth. For GPT-2-shaped float32
parameters of width 256 (``--depths`` blocks of 12 leaves, plus 4), this times, in one
process, ``jax.jit(tx.update).trace(grads, state, params).lower().compile()`` for each
optimizer: tracing, lowering and XLA's compile for this machine's default device. Each
optimizer is built afresh for every compile, so nothing is cached between them; the optimizers
alternate within each depth, so a busy machine slows them alike.

``came grouped`` is ``came(..., group_leaves=True)`` on the same leaves; the last column is its
time over per-leaf ``came``'s. It traces a far smaller program, but its updates still leave as
one slice per leaf, each at its own offset of a group's result: XLA:CPU and XLA:GPU compile every
such kernel anew, where per-leaf came's kernels repeat once per shape. ``came scanned`` is the
contrast of a model that stacks its blocks for ``jax.lax.scan`` (16 leaves at any depth) with
``batch_dims=1`` on them: the same values, but a layout the model has to choose.

With ``--target`` (a name in ``benchmarks/accelerators.py``'s ``TARGETS``) the update is compiled
ahead of time for that chip instead, its parameters sharded as there; XLA's compilers for TPUs
and GPUs spend their time differently from XLA:CPU's. That needs libtpu or the CUDA plugin, not
the accelerator.

Usage::

    python benchmarks/compile_time.py                   # 52, 148, 292 and 580 leaves
    python benchmarks/compile_time.py --depths 48 --target h100
    python benchmarks/compile_time.py --depths 48 --optimizers came,adafactor
    python benchmarks/compile_time.py --depths 48 --optimizers "came,came grouped,came scanned"
"""

from __future__ import annotations

import argparse
import platform
import time

import _models
import accelerators
import jax
import optax

import came_optax

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-3),
    "came": lambda: came_optax.came(1e-3, weight_decay=0.01),
    "came grouped": lambda: came_optax.came(1e-3, weight_decay=0.01, group_leaves=True),
    "came scanned": lambda: came_optax.came(1e-3, weight_decay=0.01, batch_dims=_layer_axis),
    "came debias cautious": lambda: came_optax.came(1e-3, debias=True, cautious=True),
}
DEFAULT_OPTIMIZERS = ("adamw", "adafactor", "came", "came grouped")
# Optimizers compiled for the model with its blocks stacked (``_models.stacked``).
SCANNED = {"came scanned"}
WIDTH, VOCAB, CONTEXT = 256, 4096, 256


def _layer_axis(params: dict) -> dict:
    """batch_dims of a stacked model: 1 for the blocks' leaves (the layer axis), 0 elsewhere."""
    return {
        **jax.tree.map(lambda _: 0, params),
        "blocks": jax.tree.map(lambda _: 1, params["blocks"]),
    }


def compile_seconds(make_tx, shapes: dict, target: str | None) -> float:
    """Seconds to trace, lower and compile one update of a fresh optimizer for ``target``."""
    tx = make_tx()
    if target is None:
        params = _models.abstract(shapes)
        state = jax.eval_shape(tx.init, params)
    else:
        params = accelerators.sharded_params(shapes, target)
        state = accelerators.abstract_state(tx, params)
    start = time.perf_counter()
    jax.jit(tx.update).trace(params, state, params).lower().compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24, 48])
    parser.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated from {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument(
        "--target",
        choices=sorted(accelerators.TARGETS),
        help="compile ahead of time for this chip (default: this machine's default device)",
    )
    args = parser.parse_args()
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    if args.target is None:
        device = jax.devices()[0]
        where = f"{device.platform}: {device.device_kind}"
    else:
        jax.config.update("jax_platforms", "cpu")  # compiled for a described chip, never run
        where = f"{args.target}: {accelerators.mesh(args.target).devices.flat[0].device_kind}"
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {where}, compiled on "
        f"{platform.processor() or platform.machine()}\n"
    )
    ratio = "came" in names and "came grouped" in names
    header = [f"{n} s" for n in names] + (["grouped / per-leaf"] if ratio else [])
    print("| blocks | leaves | " + " | ".join(header) + " |")
    print("|---:|---:|" + "---:|" * len(header))
    for depth in args.depths:
        shapes = _models.gpt2(WIDTH, depth, vocab=VOCAB, context=CONTEXT)
        leaves = len(jax.tree.leaves(_models.abstract(shapes)))
        seconds = {
            n: compile_seconds(
                OPTIMIZERS[n], _models.stacked(shapes) if n in SCANNED else shapes, args.target
            )
            for n in names
        }
        cells = [str(depth), str(leaves), *(f"{s:.1f}" for s in seconds.values())]
        if ratio:
            cells.append(f"{seconds['came grouped'] / seconds['came']:.2f}x")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
