"""A small CNN on scikit-learn's handwritten digits: CAME against AdamW.

The 1,797 8x8 digit images ship with scikit-learn, so nothing is downloaded. The two
3x3 convolutions have rank-4 kernels, ``(3, 3, in, out)``: CAME factors their last two
axes, so its statistics for them are ``(3, 3, in)`` and ``(3, 3, out)`` instead of the
full kernel. CAME (the reference form and ``debias=True``) and ``optax.adamw`` each
train the same network from the same initialisation with a warm-up + cosine schedule
peaking at the learning rate tuned for it. The script prints a table of final
train/test loss, test accuracy, optimizer-state bytes and step time, and writes a PNG
of the test curves. It takes under a minute on two CPU cores::

  python examples/train_cnn.py

``--optimizers`` also accepts ``adafactor``; every ``--lr-*`` flag takes a
comma-separated list and ``--seeds`` a list of seeds, for the learning-rate sweeps of
``examples/convergence_study.py``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import came_optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# --------------------------------------------------------------------------- config

# Peak learning rates, each the best of a sweep at the default size
# (examples/convergence_study.py; 1000 steps, 2 seeds).
TUNED_LR = {"came": 2e-3, "came-debias": 2e-2, "adamw": 5e-2, "adafactor": 1e-1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line; every default is the configuration reported in the README."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", default="came,came-debias,adamw", help="comma-separated")
    for name, lr in TUNED_LR.items():
        p.add_argument(f"--lr-{name}", default=str(lr), help="peak lr, or a comma list")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=16, help="of the first conv; doubled after")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="runs/train_cnn", help="directory for the PNG and JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def load_data() -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Digits as ``(N, 8, 8, 1)`` images in [0, 1]: a fixed, stratified 80/20 train/test split."""
    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return (jnp.asarray(x_train), jnp.asarray(y_train)), (jnp.asarray(x_test), jnp.asarray(y_test))


# ---------------------------------------------------------------------------- model


class CNN(nnx.Module):
    """Two 3x3 convolutions, a 2x2 average pool, and a two-layer classifier."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels, 2 * channels, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(4 * 4 * 2 * channels, 64, rngs=rngs)
        self.readout = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(images))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.readout(x)


def make_optimizer(name: str, lr: float, args: argparse.Namespace) -> optax.GradientTransformation:
    """The optimizer ``name`` with a linear warm-up to ``lr`` and a cosine decay to ``lr / 10``.

    AdamW and CAME decay the kernels (not the biases); ``optax.adafactor`` keeps its
    defaults except that it factors any kernel, as CAME does.
    """
    warmup_steps = max(1, int(args.warmup * args.steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, args.steps, end_value=lr / 10
    )

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    if name in ("came", "came-debias"):
        return came_optax.came(
            schedule, weight_decay=args.weight_decay, mask=decay_mask, debias=name == "came-debias"
        )
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=args.weight_decay, mask=decay_mask)
    if name == "adafactor":
        return optax.adafactor(schedule, min_dim_size_to_factor=1)
    raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(TUNED_LR)}")


# ----------------------------------------------------------------------------- step


def loss_fn(model: CNN, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy, and the logits."""
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit(static_argnames="batch_size")
def train_step(
    model: CNN, optimizer: nnx.Optimizer, train: tuple, key: jax.Array, batch_size: int
) -> jax.Array:
    """One update on a batch drawn at random from ``train``; returns the batch loss.

    One call per step: XLA:CPU runs convolutions inside a ``jax.lax.scan`` body far
    slower than at the top level, so this example does not scan over steps.
    """
    index = jax.random.randint(key, (batch_size,), 0, train[1].shape[0])
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, train[0][index], train[1][index])
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model: CNN, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Loss and accuracy over a whole split."""
    loss, logits = loss_fn(model, images, labels)
    return loss, jnp.mean(logits.argmax(-1) == labels)


# ----------------------------------------------------------------------------- loop


def train(name: str, lr: float, seed: int, args: argparse.Namespace, data: tuple) -> dict:
    """Trains one network with one optimizer; returns its curves and final numbers."""
    train_set, test_set = data
    model = CNN(args.channels, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, make_optimizer(name, lr, args), wrt=nnx.Param)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(optimizer.opt_state))
    key = jax.random.key(seed)

    curve = []
    bar = tqdm(range(args.steps), desc=f"{name} lr={lr:g} seed={seed}", disable=args.no_progress)
    for step in bar:
        batch_key = jax.random.fold_in(key, step)
        loss = train_step(model, optimizer, train_set, batch_key, args.batch_size)
        if step == 0:  # the first call compiles: time the steps after it
            loss.block_until_ready()
            start, eval_time = time.perf_counter(), 0.0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            loss.block_until_ready()
            eval_start = time.perf_counter()
            test_loss, test_acc = (float(x) for x in evaluate(model, *test_set))
            eval_time += time.perf_counter() - eval_start
            curve.append((step + 1, test_loss, test_acc))
            bar.set_postfix(test_loss=f"{test_loss:.3f}", acc=f"{test_acc:.3f}")
    train_time = time.perf_counter() - start - eval_time
    return dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        curve=curve,
        train_loss=float(evaluate(model, *train_set)[0]),
        valid_loss=curve[-1][1],
        accuracy=curve[-1][2],
        state_bytes=int(state_bytes),
        step_ms=1000 * train_time / max(args.steps - 1, 1),
    )


# --------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (optimizer, lr): means and spreads over seeds, in run order."""
    groups = {}
    for run in runs:
        groups.setdefault((run["optimizer"], run["lr"]), []).append(run)
    table = []
    for (name, lr), group in groups.items():
        mean = {k: float(np.mean([r[k] for r in group])) for k in ("train_loss", "accuracy")}
        test = np.array([r["valid_loss"] for r in group])
        table.append(
            dict(
                optimizer=name,
                lr=lr,
                seeds=len(group),
                valid_loss=float(test.mean()),
                valid_std=float(test.std()),
                state_bytes=group[0]["state_bytes"],
                step_ms=float(np.median([r["step_ms"] for r in group])),
                **mean,
            )
        )
    return table


def print_table(table: list[dict]) -> None:
    """A markdown table; with several seeds, test loss is mean ± std."""
    print("| optimizer | peak lr | train loss | test loss | test acc. | state bytes | step ms |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        spread = f" ± {r['valid_std']:.3f}" if r["seeds"] > 1 else ""
        print(
            f"| {r['optimizer']} | {r['lr']:g} | {r['train_loss']:.4f} | "
            f"{r['valid_loss']:.4f}{spread} | {100 * r['accuracy']:.1f}% | "
            f"{r['state_bytes']:,} | {r['step_ms']:.2f} |"
        )


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """Test loss and accuracy against step: a colour per optimizer, darker for higher lrs."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    groups = {}
    for run in runs:
        groups.setdefault(run["optimizer"], {}).setdefault(run["lr"], []).append(run)
    for i, (name, by_lr) in enumerate(groups.items()):
        for k, (lr, group) in enumerate(sorted(by_lr.items())):
            style = dict(color=f"C{i % 10}", alpha=(k + 1) / len(by_lr), label=f"{name} lr={lr:g}")
            curve = np.mean([r["curve"] for r in group], axis=0)
            loss_ax.plot(curve[:, 0], curve[:, 1], **style)
            acc_ax.plot(curve[:, 0], 100 * curve[:, 2], **style)
    loss_ax.set(xlabel="step", ylabel="test loss", yscale="log", title="digits CNN: test loss")
    acc_ax.set(xlabel="step", ylabel="test accuracy (%)", ylim=(90, 100), title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, ncol=1 + len(runs) // 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Trains every requested (optimizer, lr, seed), then prints the table and writes the PNG."""
    args = parse_args(argv)
    data = load_data()
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__} on {device}; "
        f"{len(data[0][1])} train / {len(data[1][1])} test images"
    )

    runs = []
    for name in args.optimizers.split(","):
        lrs = getattr(args, "lr_" + name.replace("-", "_"), None)
        if lrs is None:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(TUNED_LR)}")
        for lr in [float(x) for x in lrs.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                runs.append(train(name, lr, seed, args, data))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summarise(runs)
    print_table(table)
    plot(runs, out / "train_cnn.png")
    report = dict(device=device, args=vars(args), table=table, runs=runs)
    (out / "train_cnn.json").write_text(json.dumps(report))
    print(f"wrote {out / 'train_cnn.png'} and {out / 'train_cnn.json'}")


if __name__ == "__main__":
    main()
