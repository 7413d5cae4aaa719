"""Many layers: CAME with ``batch_dims`` on a scanned model, ``group_leaves`` on an unscanned one.

The same byte-level GPT (12 blocks of width 64 by default, trained on CPython's
``pydoc_data.topics`` as in ``train_lm.py``) is built two ways:

* unscanned: a Python list of blocks, so each weight of each layer is a leaf (138);
* scanned: the blocks made by ``nnx.vmap`` and run by ``nnx.scan``, so each weight is
  one leaf with a leading layer axis (17 leaves), and the compiler sees one block.

The scanned model starts from the unscanned model's initial weights, stacked, and every
run draws the same batches. CAME (``came(lr, debias=True, weight_decay=0.1)``) trains the
unscanned model per leaf and with ``group_leaves=True``, and the scanned model with
``batch_dims`` 1 on the blocks' leaves (0 on the embeddings, final norm and readout)
and, for contrast, with ``batch_dims=0``; ``optax.adamw`` trains both models as a
reference. The table gives, per run, the parameter leaves and optimizer-state arrays,
the compile time, the median step time, the final losses, and how far the batch losses
and final parameters are from the unscanned run of the same optimizer. The three CAME
runs that treat layers as layers agree to float32 rounding. With ``batch_dims=0`` CAME
takes the twelve layers of a weight as one tensor (one RMS clip for all twelve, and the
stacked norm scales and biases factored as if they were matrices), and its run drifts
away. The PNG plots the batch losses and their distance from the reference.

The defaults take about 2 minutes on two CPU cores::

  python examples/many_layers.py
  python examples/many_layers.py --cautious   # the form recommended for language models

``--cautious`` adds the cautious mask (``cautious=True``), whose kept fraction
``batch_dims`` also takes per layer. Its sign test is not continuous: a float32 rounding
difference in one gradient flips a few elements, so runs that agree step by step to
rounding drift apart over training. With the defaults the grouped and ``batch_dims=1``
runs then differ from the per-leaf run by up to 3e-3 in a batch loss, and by 4e-4 in
the final losses; ``batch_dims=0`` by 3.5e-2 and 1e-2.

Scan or group? Scan the layers (``nnx.scan``, or ``jax.lax.scan`` over stacked weights)
to compile the model and its gradient once for all layers; then pass CAME ``batch_dims``
(a tree, or a callable of the params as for ``mask``) saying which leading axes index
layers. Without it a stacked weight is optimized as one tensor, which is another
optimizer. A model whose layers stay separate leaves can pass ``group_leaves=True``:
leaves of one shape and dtype are updated as one batched array, with the same numbers,
so the optimizer's program holds a few kernels per shape instead of a few per leaf and
its state a few arrays (the table's state arrays). What that saves in compile and step
time depends on the backend; the table measures it on yours.
"""

from __future__ import annotations

import argparse
import functools
import time

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure

import came_optax

# --------------------------------------------------------------------------- config

# train_lm.py's tuned peak rates (for 2 layers; they train the deeper model as well).
LR = {"came": 5e-3, "adamw": 1e-2}
WARMUP, WEIGHT_DECAY, HEADS = 0.1, 0.1, 4

# Windows of the train and valid text for the final losses: enough to rank the runs,
# cheap next to training.
EVAL_WINDOWS = 256

# came()'s options beyond debias=True, weight decay and --cautious, by name, from the
# leading layer axes of each leaf (1 on a scanned model's blocks, 0 elsewhere).
CAME_OPTIONS = {
    "per leaf": lambda layer_axes: {},
    "group_leaves=True": lambda layer_axes: dict(group_leaves=True),
    "batch_dims=1 on blocks": lambda layer_axes: dict(batch_dims=layer_axes),
    "batch_dims=0": lambda layer_axes: dict(batch_dims=0),
}

# (model, optimizer, options). Each run is compared with the first, unscanned run of its
# optimizer: the reference.
RUNS = [
    ("unscanned", "adamw", "-"),
    ("scanned", "adamw", "-"),
    ("unscanned", "came", "per leaf"),
    ("unscanned", "came", "group_leaves=True"),
    ("scanned", "came", "batch_dims=1 on blocks"),
    ("scanned", "came", "batch_dims=0"),
]

# Steps left out of the median step time: the first calls after compiling run slower.
UNTIMED_STEPS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=64, help=f"a multiple of {HEADS} (heads)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    p.add_argument("--cautious", action="store_true", help="CAME with cautious=True")
    p.add_argument("--out", default="runs/many_layers", help="directory for the PNG and JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- model


class Block(nnx.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
        # No q, k, v bias: a key bias cannot change the softmax, so its gradient is rounding
        # noise, which CAME's tiny eps1 would scale up to full-size steps.
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.attn_out = nnx.Linear(d_model, d_model, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).reshape(b, t, 3 * HEADS, d // HEADS)
        attn = jax.nn.dot_product_attention(*jnp.split(qkv, 3, axis=2), is_causal=True)
        x = x + self.attn_out(attn.reshape(b, t, d))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
    """Byte embeddings plus learned positions, ``layers`` blocks, and a 256-way readout.

    With ``scan_layers`` the blocks are one ``Block`` whose weights have a leading layer
    axis, made by ``nnx.vmap`` and applied by ``nnx.scan``; without, a list of blocks.
    """

    def __init__(
        self, d_model: int, layers: int, seq_len: int, *, scan_layers: bool, rngs: nnx.Rngs
    ):
        self.scan_layers = scan_layers
        self.token_embed = nnx.Embed(256, d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(seq_len, d_model, rngs=rngs)
        if scan_layers:

            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(d_model, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(d_model, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.readout = nnx.Linear(d_model, 256, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        if self.scan_layers:
            apply = nnx.scan(lambda block, x: block(x), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            x = apply(self.blocks, x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.readout(self.norm(x))


def stack_layers(params: dict) -> dict:
    """An unscanned model's parameters as the scanned model's: each block weight stacked."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in range(len(blocks))]
    return {**params, "blocks": jax.tree.map(lambda *ws: jnp.stack(ws), *layers)}


def build_models(args: argparse.Namespace) -> dict[str, tuple[nnx.GraphDef, dict]]:
    """Each model's graph and initial parameters (a dict of arrays); the scanned model
    starts from the unscanned model's initial weights."""
    dims = (args.d_model, args.layers, args.seq_len)
    unscanned, params = nnx.split(GPT(*dims, scan_layers=False, rngs=nnx.Rngs(args.seed)))
    params = nnx.to_pure_dict(params)
    # Only the scanned model's structure is needed: its weights are the stacked ones.
    scanned, _ = nnx.split(nnx.eval_shape(lambda: GPT(*dims, scan_layers=True, rngs=nnx.Rngs(0))))
    return {"unscanned": (unscanned, params), "scanned": (scanned, stack_layers(params))}


def layer_axes(params: dict, scanned: bool) -> dict:
    """The leading axes of each leaf that index layers: 1 on a scanned model's blocks."""
    axes = jax.tree.map(lambda _: 0, params)
    if scanned:
        axes["blocks"] = jax.tree.map(lambda _: 1, params["blocks"])
    return axes


# ----------------------------------------------------------------------------- step


def make_optimizer(
    run: tuple, params: dict, args: argparse.Namespace
) -> optax.GradientTransformation:
    """``run``'s optimizer for its model's ``params``, with weight decay on matrices and
    embeddings: leaves of rank 2 or more once their layer axis is set aside."""
    model, name, options = run
    axes = layer_axes(params, model == "scanned")
    mask = jax.tree.map(lambda p, a: p.ndim - a >= 2, params, axes)
    schedule = harness.warmup_cosine(LR[name], args.steps, WARMUP)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=WEIGHT_DECAY, mask=mask)
    return came_optax.came(
        schedule,
        debias=True,
        cautious=args.cautious,
        weight_decay=WEIGHT_DECAY,
        mask=mask,
        **CAME_OPTIONS[options](axes),
    )


def loss_fn(params: dict, graphdef: nnx.GraphDef, tokens: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1].astype(jnp.int32))
    targets = tokens[:, 1:].astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_step(params, opt_state, data, key, *, graphdef, tx, batch_size, seq_len):
    """One update on a batch drawn with ``key``; returns params, state and the batch loss."""
    batch = harness.sample_batch(data, key, batch_size, seq_len)
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


eval_loss = jax.jit(loss_fn, static_argnums=1)


# ----------------------------------------------------------------------------- loop


def train(run: tuple, models: dict, args: argparse.Namespace, text: tuple) -> dict:
    """Trains ``run``'s model with its optimizer: one jitted call per step, each timed."""
    model, name, options = run
    train_data, train_eval, valid_eval = text
    graphdef, params = models[model]
    tx = make_optimizer(run, params, args)
    opt_state = tx.init(params)
    keys = list(jax.random.split(jax.random.key(args.seed), args.steps))
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, batch_size=args.batch_size, seq_len=args.seq_len
    )
    started = time.perf_counter()
    step = jax.jit(step).lower(params, opt_state, train_data, keys[0]).compile()
    compile_s = time.perf_counter() - started

    losses, seconds = [], []
    for key in harness.progress(f"{model} {name} {options}", LR[name], args.seed, args, keys):
        started = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, train_data, key)
        losses.append(loss.block_until_ready())
        seconds.append(time.perf_counter() - started)
    return dict(
        model=model,
        optimizer=name,
        options=options,
        leaves=len(jax.tree.leaves(params)),
        state_arrays=len(jax.tree.leaves(opt_state)),
        compile_s=compile_s,
        step_ms=1000 * float(np.median(seconds[UNTIMED_STEPS:] or seconds)),
        train_losses=np.asarray(jax.device_get(losses)).tolist(),
        train_loss=float(eval_loss(params, graphdef, train_eval)),
        valid_loss=float(eval_loss(params, graphdef, valid_eval)),
        params=params,
    )


# --------------------------------------------------------------------------- report


def squares(tree) -> jax.Array:
    """The sum of squares of every element of ``tree``."""
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


def compare(runs: list[dict]) -> None:
    """Adds to each run its distance from its optimizer's reference run: the batch-loss
    differences, their maximum, and the relative difference of the final parameters (the
    reference's stacked to compare with a scanned model's)."""
    references = {}
    for run in runs:
        ref = references.setdefault(run["optimizer"], run)
        ref_params = stack_layers(ref["params"]) if run["model"] == "scanned" else ref["params"]
        diff = jax.tree.map(jnp.subtract, run["params"], ref_params)
        run["reference"] = ref is run
        run["loss_diffs"] = np.abs(np.subtract(run["train_losses"], ref["train_losses"])).tolist()
        run["max_loss_diff"] = max(run["loss_diffs"])
        run["param_rel_diff"] = float(jnp.sqrt(squares(diff) / squares(ref_params)))


def distance(run: dict, key: str) -> str:
    return "reference" if run["reference"] else f"{run[key]:.1e}"


COLUMNS = {
    "model": lambda r: r["model"],
    "optimizer": lambda r: r["optimizer"],
    "options": lambda r: r["options"],
    "leaves": lambda r: str(r["leaves"]),
    "state arrays": lambda r: str(r["state_arrays"]),
    "compile s": lambda r: f"{r['compile_s']:.1f}",
    "step ms": lambda r: f"{r['step_ms']:.1f}",
    "train loss": lambda r: f"{r['train_loss']:.4f}",
    "valid loss": lambda r: f"{r['valid_loss']:.4f}",
    "max abs Δloss vs reference": lambda r: distance(r, "max_loss_diff"),
    "param rel. diff": lambda r: distance(r, "param_rel_diff"),
}


def print_table(runs: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for run in runs:
        print("| " + " | ".join(cell(run) for cell in COLUMNS.values()) + " |")


def plot(runs: list[dict]) -> Figure:
    """Smoothed batch loss (left) and the distance of each batch loss from the reference
    run's (right, on a symmetric log scale, where exact agreement is 0)."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        style = dict(color=f"C{i}", lw=1, ls="--" if run["model"] == "scanned" else "-")
        label = " ".join(run[k] for k in ("model", "optimizer", "options") if run[k] != "-")
        width = max(1, len(run["train_losses"]) // 50)
        smooth = np.convolve(run["train_losses"], np.ones(width) / width, mode="valid")
        left.plot(np.arange(width - 1, len(run["train_losses"])), smooth, label=label, **style)
        if not run["reference"]:
            right.plot(run["loss_diffs"], label=label, **style)
    left.set(xlabel="step", ylabel="batch loss (nats/byte)", title="train batch loss")
    right.set(xlabel="step", ylabel="abs Δloss", title="distance from the reference run")
    right.set_yscale("symlog", linthresh=1e-7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Trains every run of ``RUNS``, then prints the table and writes the PNG and JSON."""
    args = parse_args(argv)
    train_bytes, valid_bytes = harness.load_text()
    valid_eval = harness.windows(valid_bytes, args.seq_len, EVAL_WINDOWS)
    train_eval = harness.windows(train_bytes, args.seq_len, EVAL_WINDOWS)
    text = (jnp.asarray(train_bytes), train_eval, valid_eval)
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {device}; {args.layers} layers of width {args.d_model}")

    models = build_models(args)
    runs = [train(run, models, args, text) for run in RUNS]
    compare(runs)
    print_table(runs)
    for run in runs:
        del run["params"]
    report = dict(device=device, args=vars(args), runs=runs)
    harness.save(plot(runs), report, args.out, "many_layers")


if __name__ == "__main__":
    main()
