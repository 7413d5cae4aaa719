"""A byte-level GPT on CPython's own documentation: CAME, AdamW and Adafactor side by side.

The text is ``pydoc_data.topics`` (the help pages behind ``help('for')``), which ships
with every CPython, so nothing is downloaded. CAME (the reference form, ``debias=True``,
and the form recommended for language models, ``debias=True, cautious=True``),
``optax.adamw`` and ``optax.adafactor`` each train the same model from the same
initialisation with a warm-up + cosine schedule peaking at the learning rate tuned for
it. The script prints a table of final train/valid loss (nats per byte), optimizer-state
bytes (and their ratio to AdamW's), the state each CAME form keeps with an int8 momentum
(``mu_dtype="int8"``, computed from the shapes), and step time, and writes a loss-curve
PNG on which the recommended form stands out.

The defaults take about 2 minutes on two CPU cores::

  python examples/train_lm.py

Flags scale it up on a GPU or TPU (the tuned learning rates are for the default size;
sweep them again at another), for example::

  python examples/train_lm.py --steps 5000 --batch-size 64 --seq-len 256 \\
      --d-model 256 --layers 6 --heads 8 --lr-adamw 3e-3,1e-2 --lr-came-debias 2e-3,5e-3

Every ``--lr-*`` flag takes a comma-separated list and ``--seeds`` a list of seeds:
the script then trains every (optimizer, learning rate, seed) and reports the mean
over seeds. ``examples/convergence_study.py`` uses this for its learning-rate sweeps.
``came-debias-cautious`` is ``came(..., debias=True, cautious=True)``, with the cautious
mask of Liang et al. (2024); ``--optimizers`` also accepts ``adamw-cautious``
(``optax.adamw`` with its Adam stage wrapped in ``came_optax.cautious``). The cautious
forms start at their base optimizer's learning rate. So do the memory options
``came-debias-int8`` (``mu_dtype="int8"``) and ``came-debias-sr``
(``stochastic_rounding=True``, which matters with
``--param-dtype=bfloat16``: parameters stored in bfloat16, arithmetic in float32).
The text, the optimizers, the sweep and the report files come from ``_harness.py``.
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

# --------------------------------------------------------------------------- config

# Peak learning rates, each the best of a sweep at the default size
# (examples/convergence_study.py; 1000 steps, 2 seeds). A cautious form starts at the
# rate of the optimizer it wraps: for came-debias-cautious, 5e-3 and the study's 1e-2 give
# the same two-seed mean (1.445), 5e-3 with a fifth of the spread.
TUNED_LR = {"came": 1e-3, "came-debias": 5e-3, "adamw": 1e-2, "adafactor": 5e-2}
TUNED_LR |= {"came-debias-cautious": TUNED_LR["came-debias"], "adamw-cautious": TUNED_LR["adamw"]}
TUNED_LR |= {f"came-debias-{option}": TUNED_LR["came-debias"] for option in ("int8", "sr")}

# The form that README recommends for language models: marked in the plot.
RECOMMENDED = "came-debias-cautious"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line; every default is the configuration reported in the README."""
    p = harness.sweep_parser(
        __doc__,
        TUNED_LR,
        optimizers="came,came-debias,came-debias-cautious,adamw,adafactor",
        out="runs/train_lm",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the parameters' storage dtype; layers compute in float32",
    )
    p.add_argument("--log-every", type=int, default=50, help="steps per jitted call")
    p.add_argument("--eval-every", type=int, default=250, help="a multiple of --log-every")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- model


class Block(nnx.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP.

    Parameters are stored in ``param_dtype``; every layer computes in float32.
    """

    def __init__(self, d_model: int, heads: int, param_dtype, *, rngs: nnx.Rngs):
        self.heads = heads
        dtypes = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d_model, **dtypes)
        self.qkv = nnx.Linear(d_model, 3 * d_model, **dtypes)
        self.attn_out = nnx.Linear(d_model, d_model, **dtypes)
        self.mlp_norm = nnx.LayerNorm(d_model, **dtypes)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, **dtypes)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).reshape(b, t, 3 * self.heads, d // self.heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.reshape(b, t, d))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
    """Byte embeddings plus learned positions, ``layers`` blocks, and a 256-way readout."""

    def __init__(
        self,
        d_model: int,
        layers: int,
        heads: int,
        seq_len: int,
        param_dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        dtypes = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.token_embed = nnx.Embed(256, d_model, **dtypes)
        self.pos_embed = nnx.Embed(seq_len, d_model, **dtypes)
        self.blocks = nnx.List(
            [Block(d_model, heads, param_dtype, rngs=rngs) for _ in range(layers)]
        )
        self.norm = nnx.LayerNorm(d_model, **dtypes)
        self.readout = nnx.Linear(d_model, 256, **dtypes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x))


# ----------------------------------------------------------------------------- step


def loss_fn(model: GPT, tokens: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    logits = model(tokens[:, :-1].astype(jnp.int32))
    targets = tokens[:, 1:].astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@nnx.jit(static_argnames=("batch_size", "seq_len"))
def train_steps(
    model: GPT,
    optimizer: nnx.Optimizer,
    data: jax.Array,
    keys: jax.Array,
    batch_size: int,
    seq_len: int,
) -> jax.Array:
    """One update per key, each on a freshly sampled batch; returns the batch losses.

    The steps run in a ``jax.lax.scan``, so Python dispatches once per call, not once
    per step: with a model this small, dispatch is a sizeable share of a step.
    """
    graphdef, state = nnx.split((model, optimizer))

    def step(state, key):
        model, optimizer = nnx.merge(graphdef, state)
        batch = harness.sample_batch(data, key, batch_size, seq_len)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    state, losses = jax.lax.scan(step, state, keys)
    nnx.update((model, optimizer), state)
    return losses


eval_loss = nnx.jit(loss_fn)


# ----------------------------------------------------------------------------- loop


def train(name: str, lr: float, seed: int, args: argparse.Namespace, text: tuple) -> dict:
    """Trains one model with one optimizer; returns its curves and final numbers."""
    train_data, train_eval, valid_eval = text
    model = GPT(
        args.d_model, args.layers, args.heads, args.seq_len, args.param_dtype, rngs=nnx.Rngs(seed)
    )
    optimizer = nnx.Optimizer(model, harness.make_optimizer(name, lr, args), wrt=nnx.Param)
    key, timer = jax.random.key(seed), harness.StepTimer()

    losses, valid_curve = [], []
    bar = harness.progress(name, lr, seed, args)
    for first in range(0, args.steps, args.log_every):
        steps = np.arange(first, min(first + args.log_every, args.steps))
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, steps)
        losses.append(
            train_steps(model, optimizer, train_data, keys, args.batch_size, args.seq_len)
        )
        losses[-1].block_until_ready()
        if first == 0:  # the first call compiles: time the steps after it
            timer.start()
        if (steps[-1] + 1) % args.eval_every == 0 or steps[-1] + 1 == args.steps:
            with timer.paused():
                valid_curve.append((int(steps[-1]) + 1, float(eval_loss(model, valid_eval))))
            bar.set_postfix(valid=f"{valid_curve[-1][1]:.3f}")
        bar.update(len(steps))
    bar.close()
    step_ms = timer.ms_per_step(args.steps - min(args.log_every, args.steps))
    losses = np.concatenate(jax.device_get(losses))
    return dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        train_losses=losses.tolist(),
        valid_curve=valid_curve,
        train_loss=float(eval_loss(model, train_eval)),
        valid_loss=valid_curve[-1][1],
        state_bytes=harness.state_bytes(optimizer.opt_state),
        step_ms=step_ms,
    )


# --------------------------------------------------------------------------- report


def add_state_columns(table: list[dict], model: GPT) -> None:
    """Adds to each row AdamW's state bytes for ``model`` and, for a CAME form, the bytes of
    the same form with ``mu_dtype="int8"`` (``None`` otherwise); both from shapes alone."""
    params = nnx.state(model, nnx.Param)
    adamw = harness.planned_state_bytes("adamw", params)
    for row in table:
        row["adamw_state_bytes"] = adamw
        row["int8_state_bytes"] = harness.planned_state_bytes(
            row["optimizer"], params, mu_dtype="int8"
        )


def bytes_vs_adamw(row: dict, key: str) -> str:
    """``row[key]`` bytes and their ratio to AdamW's state, or ``-`` where there are none."""
    if row[key] is None:
        return "-"
    return f"{row[key]:,} ({row[key] / row['adamw_state_bytes']:.2f}x)"


# The table's columns after optimizer and peak lr; with several seeds, valid loss is mean ± std.
COLUMNS = {
    "train loss": lambda r: f"{r['train_loss']:.3f}",
    "valid loss": lambda r: f"{r['valid_loss']:.3f}{harness.spread(r)}",
    "state bytes (vs adamw)": lambda r: bytes_vs_adamw(r, "state_bytes"),
    "with int8 mu (vs adamw)": lambda r: bytes_vs_adamw(r, "int8_state_bytes"),
    "step ms": lambda r: f"{r['step_ms']:.1f}",
}


def plot(runs: list[dict]) -> Figure:
    """Smoothed batch loss (thin) and validation loss (markers) against step.

    One colour per optimizer, darker for higher learning rates; the recommended form's
    lines are thicker and its label says so.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, lr, group, style in harness.curves(runs):
        batch = np.mean([r["train_losses"] for r in group], axis=0)
        width = max(1, len(batch) // 50)
        smooth = np.convolve(batch, np.ones(width) / width, mode="valid")
        recommended = name == RECOMMENDED
        ax.plot(np.arange(width, len(batch) + 1), smooth, lw=1.6 if recommended else 0.8, **style)
        steps = [s for s, _ in group[0]["valid_curve"]]
        valid = np.mean([[v for _, v in r["valid_curve"]] for r in group], axis=0)
        label = f"{name} lr={lr:g}" + (" (recommended)" if recommended else "")
        ax.plot(steps, valid, "o-", lw=3 if recommended else 1.5, label=label, **style)
    finals = [r["valid_loss"] for r in runs if np.isfinite(r["valid_loss"])]
    if finals:
        ax.set_ylim(min(finals) - 0.2, min(finals) + 1.5)
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title="byte-level GPT on pydoc topics")
    ax.grid(alpha=0.3)
    ax.legend(title="valid (markers), train batch (thin)", fontsize=7, ncol=1 + len(runs) // 8)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Trains every requested (optimizer, lr, seed), then prints the table and writes the PNG."""
    args = parse_args(argv)
    train_bytes, valid_bytes = harness.load_text()
    valid_eval = harness.windows(valid_bytes, args.seq_len)
    train_eval = harness.windows(train_bytes, args.seq_len, len(valid_eval))
    text = (jnp.asarray(train_bytes), train_eval, valid_eval)
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__} on {device}; "
        f"{len(train_bytes):,} train / {len(valid_bytes):,} valid bytes"
    )

    runs = [train(name, lr, seed, args, text) for name, lr, seed in harness.grid(args)]
    table = harness.summarise(runs, means=("train_loss",))
    dims = (args.d_model, args.layers, args.heads, args.seq_len, args.param_dtype)
    add_state_columns(table, nnx.eval_shape(lambda: GPT(*dims, rngs=nnx.Rngs(0))))
    harness.print_table(table, COLUMNS)
    report = dict(device=device, args=vars(args), table=table, runs=runs)
    harness.save(plot(runs), report, args.out, "train_lm")


if __name__ == "__main__":
    main()
