"""Optimizer step time of came() against optax.adamw and optax.adafactor.

Each optimizer step is jitted with the parameters and state donated, run on
GPT-2-shaped parameters (vocabulary 50257, context 1024, width 768) with a
fixed gradient, and timed as the median over repeated steps. All optimizers
run in the same process, interleaved round by round, so the ratios are
comparable even on a busy machine. came-pytorch is timed too when installed.

Usage::

    python benchmarks/step_time.py                  # 4 and 12 blocks
    python benchmarks/step_time.py --blocks 4 --rounds 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import _models
import jax
import jax.numpy as jnp
import optax

import came_optax


def make_tree(shapes, seed):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_models.is_shape)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)],
    )


OPTIMIZERS = {
    "came": lambda: came_optax.came(1e-4, weight_decay=0.01),
    "adamw": lambda: optax.adamw(1e-4, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-4),
}


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def temp_bytes(step, params, state, grads) -> int | None:
    try:
        analysis = step.lower(params, state, grads).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None


def torch_step_time(shapes, rounds: int, steps: int) -> float | None:
    try:
        import torch
        from came_pytorch import CAME
    except ImportError:
        return None
    leaves = jax.tree.leaves(shapes, is_leaf=_models.is_shape)
    params = [torch.nn.Parameter(0.02 * torch.randn(s)) for s in leaves]
    for p in params:
        p.grad = 0.02 * torch.randn(p.shape)
    opt = CAME(params, lr=1e-4, weight_decay=0.01)
    opt.step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def bench(blocks: int, rounds: int, steps: int, with_torch: bool):
    shapes = _models.gpt2(768, blocks)
    grads = make_tree(shapes, 1)
    n_params = sum(x.size for x in jax.tree.leaves(grads))
    runs = {}
    for name, make in OPTIMIZERS.items():
        tx = make()
        params = make_tree(shapes, 0)
        state = tx.init(params)
        step = make_step(tx)
        tmp = temp_bytes(step, params, state, grads)
        params, state = step(params, state, grads)  # compile and warm up
        jax.block_until_ready(params)
        runs[name] = {"step": step, "params": params, "state": state, "times": [], "temp": tmp}
    for _ in range(rounds):
        for run in runs.values():
            params, state = run["params"], run["state"]
            start = time.perf_counter()
            for _ in range(steps):
                params, state = run["step"](params, state, grads)
            jax.block_until_ready((params, state))
            run["times"].append((time.perf_counter() - start) / steps)
            run["params"], run["state"] = params, state
    result = {name: (statistics.median(r["times"]), r["temp"]) for name, r in runs.items()}
    del runs
    torch_time = torch_step_time(shapes, max(2, rounds // 2), steps) if with_torch else None
    return n_params, result, torch_time


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per optimizer")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--no-torch", action="store_true", help="skip came-pytorch")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{device.platform}: {device.device_kind}, "
        f"{len(jax.devices())} device(s), {platform.processor() or platform.machine()}\n"
    )
    print(
        "| GPT-2 blocks | params | came ms | adamw ms | adafactor ms | came/adamw | came/adafactor "
        "| came-pytorch ms | temp MiB came / adamw / adafactor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for blocks in args.blocks:
        n, res, torch_time = bench(blocks, args.rounds, args.steps, not args.no_torch)
        c, a, f = (res[k][0] for k in ("came", "adamw", "adafactor"))
        tmp = " / ".join("n/a" if res[k][1] is None else f"{res[k][1] / 2**20:.0f}" for k in res)
        torch_ms = "n/a" if torch_time is None else f"{1e3 * torch_time:.0f}"
        print(
            f"| {blocks} | {n / 1e6:.1f}M | {1e3 * c:.0f} | {1e3 * a:.0f} | {1e3 * f:.0f} "
            f"| {c / a:.2f} | {c / f:.2f} | {torch_ms} | {tmp} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
