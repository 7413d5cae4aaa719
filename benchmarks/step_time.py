"""Measured optimizer step time of came() against optax.adamw and optax.adafactor.

Each optimizer step is jitted with the parameters and state donated, run with a fixed gradient
on GPT-2-shaped float32 parameters (``--blocks``: width 768, vocabulary 50257) or on one of the
models of ``benchmarks/accelerators.py`` (``--model``), and timed as the median over rounds of
``--steps`` steps. All optimizers run in the same process, interleaved round by round, so the
ratios are comparable even on a busy machine. came-pytorch 0.1.3 is timed too where it is
installed, on the same kind of device (``torch.cuda`` on a GPU).

On a GPU the table adds what the compiled program moves: its HBM bytes per parameter and its
kernels, read from the optimized HLO the way ``benchmarks/accelerators.py`` reads a program
compiled ahead of time, and the bandwidth those bytes take at the measured time.

Usage::

    python benchmarks/step_time.py                  # 4 and 12 blocks on the default device
    python benchmarks/step_time.py --blocks 4 --rounds 7
    python benchmarks/step_time.py --model gpt2-small gpt2-medium --optimizers all --steps 20
    python benchmarks/step_time.py --model gpt2-small --train 8x1024   # whole training steps
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import _models
import accelerators
import jax
import jax.numpy as jnp
import optax

import came_optax

OPTIMIZERS = {
    "came": lambda: came_optax.came(1e-4, weight_decay=0.01),
    "came debias": lambda: came_optax.came(1e-4, weight_decay=0.01, debias=True),
    "came bf16 mu": lambda: came_optax.came(1e-4, weight_decay=0.01, mu_dtype="bfloat16"),
    "came int8 mu": lambda: came_optax.came(1e-4, weight_decay=0.01, mu_dtype="int8"),
    "came debias cautious": lambda: came_optax.came(
        1e-4, weight_decay=0.01, debias=True, cautious=True
    ),
    "came grouped": lambda: came_optax.came(1e-4, weight_decay=0.01, group_leaves=True),
    "adamw": lambda: optax.adamw(1e-4, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-4),
}
DEFAULT_OPTIMIZERS = ("came", "came grouped", "adamw", "adafactor")
BASELINE = "adamw"


def make_tree(shapes, seed):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_models.is_shape)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)],
    )


def make_step(tx, train: bool = False):
    """The donated step; with ``train``, its third argument is tokens and the gradient is the
    causal LM loss's (``_models.causal_lm_loss``: bf16 matrix products, remat per block)."""

    def step(params, state, grads):
        if train:
            grads = jax.grad(_models.causal_lm_loss)(params, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def program(compiled) -> dict:
    """XLA's temporary bytes and, on a GPU, the optimized program's HBM traffic and kernels."""
    out = {"temp": None, "hbm_bytes": None, "kernels": None}
    try:
        out["temp"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    if jax.devices()[0].platform == "gpu":
        summary = accelerators.hlo_summary(compiled.as_text())
        out["hbm_bytes"], out["kernels"] = summary["hbm_bytes"], summary["kernels"]
    return out


def torch_step_time(shapes, rounds: int, steps: int, device: str) -> float | None:
    """Median seconds per ``came_pytorch.CAME`` step on ``device``, or None where absent."""
    try:
        import torch
        from came_pytorch import CAME
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    leaves = jax.tree.leaves(shapes, is_leaf=_models.is_shape)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in leaves]
    for p in params:
        p.grad = 0.02 * torch.randn(p.shape, device=device)
    opt = CAME(params, lr=1e-4, weight_decay=0.01)
    opt.step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def bench(shapes, names, rounds: int, steps: int, torch_device: str | None, train=None):
    """Per optimizer: median seconds per step and what its program moves.

    ``train``, a ``(batch, sequence)`` pair, times whole training steps on random tokens.
    """
    if train is None:
        grads = make_tree(shapes, 1)
    else:
        vocab = (shapes["wte"] if "wte" in shapes else shapes["embed"])[0]
        grads = jax.random.randint(jax.random.key(1), (train[0], train[1] + 1), 0, vocab)
    runs = {}
    for name in names:
        tx = OPTIMIZERS[name]()
        params = make_tree(shapes, 0)
        state = tx.init(params)
        # Compiled once: the timed calls run the program that was read.
        step = make_step(tx, train is not None).lower(params, state, grads).compile()
        info = program(step)
        params, state = step(params, state, grads)  # warm up
        jax.block_until_ready(params)
        runs[name] = {"step": step, "params": params, "state": state, "times": [], **info}
    for _ in range(rounds):
        for run in runs.values():
            params, state = run["params"], run["state"]
            jax.block_until_ready((params, state))
            start = time.perf_counter()
            for _ in range(steps):
                params, state = run["step"](params, state, grads)
            jax.block_until_ready((params, state))
            run["times"].append((time.perf_counter() - start) / steps)
            run["params"], run["state"] = params, state
    for run in runs.values():
        run["time"] = statistics.median(run["times"])
        del run["step"], run["params"], run["state"]
    del grads
    torch_time = None
    if torch_device is not None:
        torch_time = torch_step_time(shapes, max(2, rounds // 2), steps, torch_device)
    return runs, torch_time


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 12])
    parser.add_argument(
        "--model", nargs="+", choices=sorted(accelerators.MODELS), help="instead of --blocks"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated from {', '.join(OPTIMIZERS)}, or 'all'",
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per optimizer")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--no-torch", action="store_true", help="skip came-pytorch")
    parser.add_argument(
        "--stacked",
        action="store_true",
        help="store each --model's blocks stacked along a leading layer axis, as a model that "
        "scans its layers does (one leaf per kind of weight instead of one per block)",
    )
    parser.add_argument(
        "--train",
        metavar="BATCHxSEQ",
        help="time whole training steps (forward, backward, update) of a GPT-2/LLaMA --model "
        "on BATCH random sequences of SEQ tokens, e.g. 8x1024",
    )
    args = parser.parse_args()
    train = None
    if args.train:
        try:
            train = tuple(int(n) for n in args.train.split("x"))
            assert len(train) == 2 and min(train) > 0
        except (ValueError, AssertionError):
            parser.error(f"--train: expected BATCHxSEQ such as 8x1024; got {args.train!r}")
        if not args.model or any(m.startswith("vit") for m in args.model):
            parser.error("--train needs --model with GPT-2 or LLaMA models")
    names = list(OPTIMIZERS) if args.optimizers == "all" else args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    if BASELINE not in names:
        names.append(BASELINE)

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{device.platform}: {device.device_kind}, "
        f"{len(jax.devices())} device(s), {platform.processor() or platform.machine()}\n"
    )
    models = (
        {m: accelerators.MODELS[m] for m in args.model}
        if args.model
        else {f"GPT-2, {b} blocks": _models.gpt2(768, b) for b in args.blocks}
    )
    if args.stacked:
        models = {f"{m}, stacked": _models.stacked(shapes) for m, shapes in models.items()}
    gpu_head = " | HBM B/param | kernels | GB/s" if on_gpu else ""
    if train:
        print(f"Whole training steps: forward, backward and update, {train[0]}x{train[1]} tokens.")
        gpu_head = ""
    print(f"| model | params | optimizer | ms / step | vs {BASELINE} | XLA temp MiB{gpu_head} |")
    print("|---|---:|---|---:|---:|---:" + ("|---:|---:|---:" if gpu_head else "") + "|")
    for model, shapes in models.items():
        n = _models.num_params(shapes)
        torch_device = None if args.no_torch or train else ("cuda" if on_gpu else "cpu")
        runs, torch_time = bench(shapes, names, args.rounds, args.steps, torch_device, train)
        base = runs[BASELINE]["time"]
        label = f"{model} | {n / 1e6:.1f}M"
        for name, run in runs.items():
            temp = "n/a" if run["temp"] is None else f"{run['temp'] / 2**20:.0f}"
            cells = [label, name, _ms(run["time"]), f"{run['time'] / base:.2f}", temp]
            if gpu_head:
                moved, kernels = run["hbm_bytes"], run["kernels"]
                cells += [f"{moved / n:.1f}", str(kernels), f"{moved / run['time'] / 1e9:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
            label = " | "
        if torch_time is not None:
            ratio = f"{torch_time / base:.2f}"
            cells = [label, "came-pytorch 0.1.3", _ms(torch_time), ratio, "n/a"]
            print("| " + " | ".join(cells + (["n/a"] * 3 if gpu_head else [])) + " |", flush=True)


if __name__ == "__main__":
    main()
