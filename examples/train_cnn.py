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

``--optimizers`` also accepts ``adafactor`` and the cautious forms (Liang et al., 2024)
``came-debias-cautious`` and ``adamw-cautious``, which start at their base optimizer's
learning rate; every ``--lr-*`` flag takes a comma-separated list and ``--seeds`` a list
of seeds, for the learning-rate sweeps of ``examples/convergence_study.py``. The
optimizers, the sweep and the report files come from ``_harness.py``.
"""

from __future__ import annotations

import argparse

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# --------------------------------------------------------------------------- config

# Peak learning rates, each the best of a sweep at the default size
# (examples/convergence_study.py; 1000 steps, 2 seeds). A cautious form starts at the
# rate of the optimizer it wraps.
TUNED_LR = {"came": 2e-3, "came-debias": 2e-2, "adamw": 5e-2, "adafactor": 1e-1}
TUNED_LR |= {"came-debias-cautious": TUNED_LR["came-debias"], "adamw-cautious": TUNED_LR["adamw"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line; every default is the configuration reported in the README."""
    p = harness.sweep_parser(
        __doc__, TUNED_LR, optimizers="came,came-debias,adamw", out="runs/train_cnn"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=16, help="of the first conv; doubled after")
    p.add_argument("--eval-every", type=int, default=50)
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
    optimizer = nnx.Optimizer(model, harness.make_optimizer(name, lr, args), wrt=nnx.Param)
    key, timer = jax.random.key(seed), harness.StepTimer()

    curve = []
    bar = harness.progress(name, lr, seed, args, range(args.steps))
    for step in bar:
        batch_key = jax.random.fold_in(key, step)
        loss = train_step(model, optimizer, train_set, batch_key, args.batch_size)
        if step == 0:  # the first call compiles: time the steps after it
            loss.block_until_ready()
            timer.start()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            loss.block_until_ready()
            with timer.paused():
                test_loss, test_acc = (float(x) for x in evaluate(model, *test_set))
            curve.append((step + 1, test_loss, test_acc))
            bar.set_postfix(test_loss=f"{test_loss:.3f}", acc=f"{test_acc:.3f}")
    step_ms = timer.ms_per_step(args.steps - 1)
    return dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        curve=curve,
        train_loss=float(evaluate(model, *train_set)[0]),
        valid_loss=curve[-1][1],
        accuracy=curve[-1][2],
        state_bytes=harness.state_bytes(optimizer.opt_state),
        step_ms=step_ms,
    )


# --------------------------------------------------------------------------- report

# The table's columns after optimizer and peak lr; with several seeds, test loss is mean ± std.
COLUMNS = {
    "train loss": lambda r: f"{r['train_loss']:.4f}",
    "test loss": lambda r: f"{r['valid_loss']:.4f}{harness.spread(r)}",
    "test acc.": lambda r: f"{100 * r['accuracy']:.1f}%",
    "state bytes": lambda r: f"{r['state_bytes']:,}",
    "step ms": lambda r: f"{r['step_ms']:.2f}",
}


def plot(runs: list[dict]) -> Figure:
    """Test loss and accuracy against step: a colour per optimizer, darker for higher lrs."""
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for name, lr, group, style in harness.curves(runs):
        curve = np.mean([r["curve"] for r in group], axis=0)
        loss_ax.plot(curve[:, 0], curve[:, 1], label=f"{name} lr={lr:g}", **style)
        acc_ax.plot(curve[:, 0], 100 * curve[:, 2], label=f"{name} lr={lr:g}", **style)
    loss_ax.set(xlabel="step", ylabel="test loss", yscale="log", title="digits CNN: test loss")
    acc_ax.set(xlabel="step", ylabel="test accuracy (%)", ylim=(90, 100), title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, ncol=1 + len(runs) // 8)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Trains every requested (optimizer, lr, seed), then prints the table and writes the PNG."""
    args = parse_args(argv)
    data = load_data()
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__} on {device}; "
        f"{len(data[0][1])} train / {len(data[1][1])} test images"
    )

    runs = [train(name, lr, seed, args, data) for name, lr, seed in harness.grid(args)]
    table = harness.summarise(runs, means=("train_loss", "accuracy"))
    harness.print_table(table, COLUMNS)
    report = dict(device=device, args=vars(args), table=table, runs=runs)
    harness.save(plot(runs), report, args.out, "train_cnn")


if __name__ == "__main__":
    main()
