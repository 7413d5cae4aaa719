"""Compile time of one optimizer update against the number of parameter leaves.

An unscanned model keeps one leaf per weight of every block, so an optimizer that traces its
math leaf by leaf compiles a program that grows with the depth. For GPT-2-shaped float32
parameters of width 256 (``--depths`` blocks of 12 leaves, plus 4), this times, in one
process, ``jax.jit(tx.update).trace(grads, state, params).lower().compile()`` for each
optimizer: tracing, lowering and XLA's compile for this machine's default device. Each
optimizer is built afresh for every compile, so nothing is cached between them; the optimizers
alternate within each depth, so a busy machine slows them alike.

Usage::

    python benchmarks/compile_time.py                   # 52, 148, 292 and 580 leaves
    python benchmarks/compile_time.py --depths 48 --optimizers came,adafactor
"""

from __future__ import annotations

import argparse
import platform
import time

import _models
import jax
import optax

import came_optax

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-3),
    "came": lambda: came_optax.came(1e-3, weight_decay=0.01),
    "came debias cautious": lambda: came_optax.came(1e-3, debias=True, cautious=True),
}
DEFAULT_OPTIMIZERS = ("adamw", "adafactor", "came")
WIDTH, VOCAB, CONTEXT = 256, 4096, 256


def compile_seconds(make_tx, shapes: dict) -> float:
    """Seconds to trace, lower and compile one update of a fresh optimizer."""
    tx = make_tx()
    params = _models.abstract(shapes)
    state = jax.eval_shape(tx.init, params)
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
    args = parser.parse_args()
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, {device.platform}: "
        f"{device.device_kind}, {platform.processor() or platform.machine()}\n"
    )
    print("| blocks | leaves | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for depth in args.depths:
        shapes = _models.gpt2(WIDTH, depth, vocab=VOCAB, context=CONTEXT)
        leaves = len(jax.tree.leaves(_models.abstract(shapes)))
        seconds = [compile_seconds(OPTIMIZERS[n], shapes) for n in names]
        cells = [str(depth), str(leaves), *(f"{s:.1f}" for s in seconds)]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
