"""Learning-rate sweeps of CAME, CAME with ``debias=True``, AdamW, Adafactor and cautious forms.

The cautious forms are ``came-debias-cautious`` (``came(..., debias=True, cautious=True)``)
and ``adamw-cautious`` (``optax.adamw`` with its Adam stage wrapped in
``came_optax.cautious``); each sweeps the grid of the optimizer it wraps. On both
examples, ``train_lm.py`` (byte-level GPT) and ``train_cnn.py`` (digits CNN),
each optimizer trains at every learning rate of its grid for every seed; the study
then prints, per task, the best peak learning rate of each optimizer by mean final
validation loss, the whole sweep, and the run time, and writes a plot. One command
runs it::

  python examples/convergence_study.py

The four optimizers without a cautious form take 18-22 minutes on two CPU cores; each
cautious form adds about as long as the optimizer it wraps. The examples run as
subprocesses with their own flags and write JSON, which this script reads back;
``--steps``, ``--seeds``, ``--tasks`` and ``--optimizers`` shrink or grow the study,
for example::

  python examples/convergence_study.py --tasks=cnn --optimizers=adamw,adamw-cautious
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import _harness as harness
import jax
import numpy as np
from matplotlib.figure import Figure

# --------------------------------------------------------------------------- config

EXAMPLES = pathlib.Path(__file__).resolve().parent
OPTIMIZERS = tuple(harness.OPTIMIZERS)

# Peak learning rates on a 1-2-5 log grid around each optimizer's optimum (found with
# a wider, one-seed sweep); the tables flag a best value that lands on a grid edge.
GRIDS = {
    "lm": {
        "came": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3),
        "came-debias": (2e-3, 5e-3, 1e-2, 2e-2, 5e-2),
        "adamw": (2e-3, 5e-3, 1e-2, 2e-2, 5e-2),
        "adafactor": (1e-2, 2e-2, 5e-2, 1e-1, 2e-1),
    },
    "cnn": {
        "came": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
        "came-debias": (5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
        "adamw": (5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
        "adafactor": (1e-2, 2e-2, 5e-2, 1e-1, 2e-1),
    },
}
# A cautious form sweeps the grid of the optimizer it wraps.
for grids in GRIDS.values():
    grids["came-debias-cautious"] = grids["came-debias"]
    grids["adamw-cautious"] = grids["adamw"]
SCRIPTS = {"lm": "train_lm.py", "cnn": "train_cnn.py"}
LOSS_NAME = {"lm": "valid loss (nats/byte)", "cnn": "test loss"}
TITLES = {"lm": "byte-level GPT (train_lm.py)", "cnn": "digits CNN (train_cnn.py)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line; the defaults are the study reported in the README."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="lm,cnn", help="comma-separated: lm, cnn")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    p.add_argument("--seeds", default="0,1", help="comma-separated")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default="runs/convergence_study", help="directory for results")
    p.add_argument("--no-progress", action="store_true", help="hide the examples' bars")
    args = p.parse_args(argv)
    for flag, names, known in (
        ("tasks", args.tasks, SCRIPTS),
        ("optimizers", args.optimizers, OPTIMIZERS),
    ):
        for name in names.split(","):
            if name not in known:
                p.error(f"--{flag}: unknown {name!r}; choose from {', '.join(known)}")
    return args


# ---------------------------------------------------------------------------- sweep


def sweep(task: str, optimizer: str, args: argparse.Namespace, out: pathlib.Path) -> dict:
    """Runs one example over one optimizer's grid and seeds; returns the example's JSON."""
    lrs = ",".join(f"{lr:g}" for lr in GRIDS[task][optimizer])
    command = [
        sys.executable,
        str(EXAMPLES / SCRIPTS[task]),
        f"--optimizers={optimizer}",
        f"--lr-{optimizer}={lrs}",
        f"--seeds={args.seeds}",
        f"--steps={args.steps}",
        f"--out={out}",
    ]
    if args.no_progress:
        command.append("--no-progress")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"train_{task}.json").read_text())


def best_rows(runs: list[dict]) -> list[dict]:
    """Per optimizer, every learning rate's final losses and the one with the lowest mean.

    A learning rate where any seed diverged counts as infinitely bad.
    """
    rows = []
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        by_lr = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r["valid_loss"])
        means = {lr: np.mean(v) if np.all(np.isfinite(v)) else np.inf for lr, v in by_lr.items()}
        best = min(means, key=means.get)
        rows.append(
            dict(
                optimizer=name,
                lr=best,
                mean=float(np.mean(by_lr[best])),
                std=float(np.std(by_lr[best])),
                seeds=by_lr[best],
                edge=best in (min(by_lr), max(by_lr)),
                state_bytes=mine[0]["state_bytes"],
                step_ms=float(np.median([r["step_ms"] for r in mine])),
                by_lr=by_lr,
            )
        )
    return rows


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1] for line in f if line.startswith("model name")]
        return names[0].strip()
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- report


def print_tables(task: str, rows: list[dict], minutes: float) -> None:
    """The best learning rate per optimizer, then every point of the sweep, as markdown."""
    print(f"\n### {task}: best peak lr by mean final {LOSS_NAME[task]} ({minutes:.1f} min)\n")
    print("| optimizer | best lr | final loss, mean ± std | per seed | state bytes | step ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        edge = " (grid edge)" if r["edge"] else ""
        seeds = ", ".join(f"{x:.4f}" for x in r["seeds"])
        print(
            f"| {r['optimizer']} | {r['lr']:g}{edge} | {r['mean']:.4f} ± {r['std']:.4f} | "
            f"{seeds} | {r['state_bytes']:,} | {r['step_ms']:.1f} |"
        )
    lrs = sorted({lr for r in rows for lr in r["by_lr"]})
    print(f"\nThe sweep: final {LOSS_NAME[task]}, mean over seeds, per peak lr (best in bold).\n")
    print("| optimizer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    for r in rows:
        cells = []
        for lr in lrs:
            loss = f"{np.mean(r['by_lr'][lr]):.4f}" if lr in r["by_lr"] else ""
            cells.append(f"**{loss}**" if lr == r["lr"] else loss)
        print(f"| {r['optimizer']} | " + " | ".join(cells) + " |")


def plot(results: dict) -> Figure:
    """Final loss against peak learning rate (seed mean, min-max bars), one panel per task."""
    fig = Figure(figsize=(6 * len(results), 4.5))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (task, rows) in zip(axes[0], results.items(), strict=True):
        finite = []
        for i, r in enumerate(rows):
            lrs = np.array(sorted(r["by_lr"]))
            losses = [np.array(r["by_lr"][lr]) for lr in lrs]
            mean = np.array([v.mean() for v in losses])
            bars = np.array([[v.mean() - v.min(), v.max() - v.mean()] for v in losses]).T
            label = f"{r['optimizer']} (best {r['lr']:g}: {r['mean']:.3f})"
            ax.errorbar(lrs, mean, yerr=bars, fmt="o-", color=f"C{i}", capsize=3, label=label)
            finite += [m for m in mean if np.isfinite(m)]
        if finite:
            low = min(finite)
            ax.set_ylim(low - 0.05 * abs(low) - 0.01, low + 0.5 * abs(low) + 0.05)
        ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final {LOSS_NAME[task]}")
        ax.set_title(TITLES[task])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Runs every sweep, then prints the tables and writes the plot and a JSON summary."""
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    print(f"{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}")
    print(f"{args.steps} steps, seeds {args.seeds}")

    start, results, minutes, device = time.perf_counter(), {}, {}, ""
    for task in args.tasks.split(","):
        task_start, runs = time.perf_counter(), []
        for optimizer in args.optimizers.split(","):
            print(f"{task} / {optimizer}: peak lrs {GRIDS[task][optimizer]}", flush=True)
            report = sweep(task, optimizer, args, out / task / optimizer)
            runs += report["runs"]
            device = report["device"]
        results[task] = best_rows(runs)
        minutes[task] = (time.perf_counter() - task_start) / 60

    machine = f"{device} ({cpu_name()}, {os.cpu_count()} cores), jax {jax.__version__}"
    for task, rows in results.items():
        print_tables(task, rows, minutes[task])
    total = (time.perf_counter() - start) / 60
    print(f"\nThe whole study took {total:.1f} min on {machine}.")
    summary = dict(machine=machine, args=vars(args), minutes=minutes, total_minutes=total)
    summary["results"] = {
        task: [dict(r, by_lr={f"{lr:g}": v for lr, v in r["by_lr"].items()}) for r in rows]
        for task, rows in results.items()
    }
    harness.save(plot(results), summary, out, "convergence_study", indent=1)


if __name__ == "__main__":
    main()
