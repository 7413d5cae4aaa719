"""What the examples share: optimizers, the sweep, the byte text, timing and the report.

``train_lm.py`` and ``train_cnn.py`` each keep their own config, model, step and loop;
this module holds the parts that are the same in both: the optimizers by name (each
with a warm-up + cosine schedule and weight decay on matrices), the command-line flags
of a sweep, the (optimizer, learning rate, seed) grid, a progress bar, the step timer,
the optimizer-state bytes, the per-(optimizer, learning rate) summary, the markdown
table, and the PNG + JSON files. The byte-level text and its batches serve
``train_lm.py`` and ``many_layers.py``, which also takes the schedule, the progress
bar and the file writer. ``convergence_study.py`` takes the optimizer names and the
file writer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure
from tqdm import tqdm

import came_optax

# ------------------------------------------------------------------------- optimizers


def decay_mask(params: optax.Params) -> optax.Params:
    """Weight decay on matrices, kernels and embeddings; not on biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _cautious_adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float):
    """``optax.adamw``'s chain with its Adam stage masked by ``came_optax.cautious``."""
    return optax.chain(
        came_optax.cautious(optax.scale_by_adam()),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# CAME's forms by name: came()'s options beyond the learning rate, weight decay and mask.
CAME_FORMS: dict[str, dict] = {
    "came": {},
    "came-debias": dict(debias=True),
    "came-debias-cautious": dict(debias=True, cautious=True),
    # The memory options: an int8 momentum, and stochastic rounding of bf16/fp16 parameters.
    "came-debias-int8": dict(debias=True, mu_dtype="int8"),
    "came-debias-sr": dict(debias=True, stochastic_rounding=True),
}


def _came(**options) -> Callable[[optax.ScalarOrSchedule, float], optax.GradientTransformation]:
    return lambda lr, wd: came_optax.came(lr, weight_decay=wd, mask=decay_mask, **options)


# Every optimizer an example can run, from (learning rate or schedule, weight decay).
# optax.adafactor keeps its defaults (no weight decay) except that it factors any matrix,
# as CAME does, instead of only those with both sides >= 128.
OPTIMIZERS: dict[str, Callable[[optax.ScalarOrSchedule, float], optax.GradientTransformation]] = {
    **{name: _came(**options) for name, options in CAME_FORMS.items()},
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd, mask=decay_mask),
    "adamw-cautious": _cautious_adamw,
    "adafactor": lambda lr, wd: optax.adafactor(lr, min_dim_size_to_factor=1),
}


def make_optimizer(name: str, lr: float, args: argparse.Namespace) -> optax.GradientTransformation:
    """The optimizer ``name`` with a linear warm-up to ``lr`` and a cosine decay to ``lr / 10``.

    The warm-up lasts ``args.warmup`` of ``args.steps``; the decay ends at the last step.
    """
    return OPTIMIZERS[name](warmup_cosine(lr, args.steps, args.warmup), args.weight_decay)


def warmup_cosine(lr: float, steps: int, warmup: float) -> optax.Schedule:
    """A linear warm-up over ``warmup`` of ``steps`` to ``lr``, then a cosine decay to
    ``lr / 10`` at the last step."""
    warmup_steps = max(1, int(warmup * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, end_value=lr / 10)


# ------------------------------------------------------------------------------- data


def load_text() -> tuple[np.ndarray, np.ndarray]:
    """CPython's help topics as UTF-8 bytes: the first 90% to train on, the rest to validate.

    The topics are joined in sorted order, so the split is the same on every run (the
    text itself differs a little between Python versions).
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def windows(data: np.ndarray, seq_len: int, count: int | None = None) -> jax.Array:
    """Consecutive non-overlapping windows of ``seq_len + 1`` bytes (input plus target)."""
    n = (len(data) - 1) // seq_len
    if count is not None:
        n = min(n, count)
    starts = np.arange(n) * seq_len
    return jnp.asarray(data[starts[:, None] + np.arange(seq_len + 1)])


def sample_batch(data: jax.Array, key: jax.Array, batch_size: int, seq_len: int) -> jax.Array:
    """Windows of ``seq_len + 1`` bytes at random offsets, drawn on the device."""
    starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - seq_len - 1)
    return data[starts[:, None] + jnp.arange(seq_len + 1)]


# ------------------------------------------------------------------------------ sweep


def sweep_parser(
    doc: str, tuned_lr: dict[str, float], optimizers: str, out: str
) -> argparse.ArgumentParser:
    """The flags every sweep has; an example adds its data and model flags to the parser.

    Args:
      doc: the example's docstring; its first line describes the command.
      tuned_lr: the default peak learning rate of each optimizer the example offers; each
        gets a ``--lr-<name>`` flag that takes one rate or a comma-separated list.
      optimizers: the default of ``--optimizers``, a comma-separated subset of ``tuned_lr``.
      out: the default directory for the PNG and JSON.
    """
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument(
        "--optimizers", default=optimizers, help=f"comma-separated, from {', '.join(tuned_lr)}"
    )
    for name, lr in tuned_lr.items():
        p.add_argument(f"--lr-{name}", default=str(lr), help="peak lr, or a comma list")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--out", default=out, help="directory for the PNG and JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def grid(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """Every requested (optimizer, peak lr, seed): optimizers in order, then lrs, then seeds."""
    runs = []
    for name in args.optimizers.split(","):
        lrs = getattr(args, "lr_" + name.replace("-", "_"), None)
        if lrs is None:
            offered = [k[3:].replace("_", "-") for k in vars(args) if k.startswith("lr_")]
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(offered)}")
        for lr in [float(x) for x in lrs.split(",")]:
            runs += [(name, lr, int(seed)) for seed in args.seeds.split(",")]
    return runs


def progress(name: str, lr: float, seed: int, args: argparse.Namespace, iterable=None) -> tqdm:
    """A bar of ``args.steps`` for one run, over ``iterable`` if given; off with --no-progress."""
    return tqdm(
        iterable, total=args.steps, desc=f"{name} lr={lr:g} seed={seed}", disable=args.no_progress
    )


class StepTimer:
    """Wall time of the training steps: started after the first call (which compiles),
    paused while evaluating."""

    def start(self) -> None:
        self.started, self.excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        paused_at = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - paused_at

    def ms_per_step(self, steps: int) -> float:
        """Milliseconds per step, over ``steps`` timed steps."""
        return 1000 * (time.perf_counter() - self.started - self.excluded) / max(steps, 1)


def state_bytes(opt_state: optax.OptState) -> int:
    """Bytes of every array (or ``jax.ShapeDtypeStruct``) in an optimizer state."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)))


def planned_state_bytes(name: str, params: optax.Params, **options) -> int | None:
    """Bytes of optimizer ``name``'s state for ``params`` (arrays or shapes), nothing allocated.

    ``options`` change a CAME form's ``came()`` arguments (``mu_dtype="int8"``: the same form
    with an int8 momentum); for another optimizer they give ``None``.
    """
    schedule = optax.constant_schedule(0.0)  # a schedule keeps a step count, as in a run
    if name in CAME_FORMS:
        tx = _came(**{**CAME_FORMS[name], **options})(schedule, 0.0)
    elif options:
        return None
    else:
        tx = OPTIMIZERS[name](schedule, 0.0)
    return state_bytes(jax.eval_shape(tx.init, params))


# ----------------------------------------------------------------------------- report


def summarise(runs: list[dict], means: tuple[str, ...]) -> list[dict]:
    """One row per (optimizer, lr), in run order, over its seeds.

    A row holds the mean of each key in ``means``, the mean and standard deviation of
    ``valid_loss``, the state bytes and the median step time.
    """
    groups = {}
    for run in runs:
        groups.setdefault((run["optimizer"], run["lr"]), []).append(run)
    table = []
    for (name, lr), group in groups.items():
        valid = np.array([r["valid_loss"] for r in group])
        table.append(
            dict(
                optimizer=name,
                lr=lr,
                seeds=len(group),
                **{k: float(np.mean([r[k] for r in group])) for k in means},
                valid_loss=float(valid.mean()),
                valid_std=float(valid.std()),
                state_bytes=group[0]["state_bytes"],
                step_ms=float(np.median([r["step_ms"] for r in group])),
            )
        )
    return table


def spread(row: dict) -> str:
    """`` ± std`` of the valid loss over seeds, or nothing for one seed."""
    return f" ± {row['valid_std']:.3f}" if row["seeds"] > 1 else ""


def print_table(table: list[dict], columns: dict[str, Callable[[dict], str]]) -> None:
    """A markdown table: optimizer, peak lr, then one cell per ``columns`` entry of each row."""
    headers = ["optimizer", "peak lr", *columns]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in table:
        cells = [r["optimizer"], f"{r['lr']:g}", *(cell(r) for cell in columns.values())]
        print("| " + " | ".join(cells) + " |")


def curves(runs: list[dict]) -> Iterator[tuple[str, float, list[dict], dict]]:
    """``(optimizer, lr, runs over seeds, line style)``: a colour per optimizer, darker for
    higher learning rates."""
    groups = {}
    for run in runs:
        groups.setdefault(run["optimizer"], {}).setdefault(run["lr"], []).append(run)
    for i, (name, by_lr) in enumerate(groups.items()):
        for k, (lr, group) in enumerate(sorted(by_lr.items())):
            yield name, lr, group, dict(color=f"C{i % 10}", alpha=(k + 1) / len(by_lr))


def save(fig: Figure, report: dict, out: str | pathlib.Path, stem: str, indent=None) -> None:
    """Writes ``<out>/<stem>.png`` and ``<out>/<stem>.json`` and says so."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=indent))
    print(f"wrote {out / f'{stem}.png'} and {out / f'{stem}.json'}")
