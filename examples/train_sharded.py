"""Train a small Flax NNX transformer with CAME, sharded FSDP + tensor-parallel.

Every kernel is split over a 2-D ``(data, model)`` device mesh: fully sharded
data parallelism over ``data`` (each device keeps 1/data of every kernel, and the
batch is split the same way) and tensor parallelism over ``model`` (attention
heads and MLP hidden units). ``nnx.Optimizer`` with ``came_optax.came`` needs no
sharding code: the momentum is sharded like its kernel and the factored row and
column statistics like the kernel without the averaged axis. The script prints
each device's bytes of parameters and of optimizer state.

It uses whatever devices exist. On a machine with only a CPU it simulates 8
devices (``--cpu-devices``). The text is this file, read byte by byte::

    python examples/train_sharded.py
    python examples/train_sharded.py --steps 200 --model-parallel 4
"""

import argparse
from pathlib import Path

import jax

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=64)
parser.add_argument("--d-model", type=int, default=64)
parser.add_argument("--num-heads", type=int, default=4)
parser.add_argument("--num-layers", type=int, default=2)
parser.add_argument("--learning-rate", type=float, default=2e-3)
parser.add_argument("--weight-decay", type=float, default=0.01)
parser.add_argument("--model-parallel", type=int, default=2, help="size of the 'model' axis")
parser.add_argument("--cpu-devices", type=int, default=8, help="CPU devices to simulate")
args = parser.parse_args()

# Must precede the first use of a device; ignored by GPU and TPU backends.
jax.config.update("jax_num_cpu_devices", args.cpu_devices)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import came_optax  # noqa: E402

VOCAB = 256  # bytes

# --- Mesh -----------------------------------------------------------------------------------

n_devices = jax.device_count()
model_axis = args.model_parallel if n_devices % args.model_parallel == 0 else 1
mesh = jax.make_mesh(
    (n_devices // model_axis, model_axis), ("data", "model"), axis_types=(AxisType.Auto,) * 2
)
print(f"{n_devices} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")

# --- Data -----------------------------------------------------------------------------------

text = np.frombuffer(Path(__file__).read_bytes(), dtype=np.uint8).astype(np.int32)
rng = np.random.default_rng(0)


def batch():
    starts = rng.integers(0, len(text) - args.seq_len - 1, size=args.batch_size)
    window = np.stack([text[s : s + args.seq_len + 1] for s in starts])
    return window[:, :-1], window[:, 1:]


# --- Model ----------------------------------------------------------------------------------


def sharded(spec, init=None):
    """An initializer whose parameter carries ``spec`` (one mesh axis or None per axis)."""
    return nnx.with_partitioning(init or nnx.initializers.lecun_normal(), spec)


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
        # Kernels (d, heads, head_dim) and (heads, head_dim, d): heads over 'model'.
        self.attn = nnx.MultiHeadAttention(
            heads,
            d,
            kernel_init=sharded(("data", "model", None)),
            out_kernel_init=sharded(("model", None, "data")),
            use_bias=False,
            decode=False,
            rngs=rngs,
        )
        self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(
            d, 4 * d, kernel_init=sharded(("data", "model")),
            bias_init=sharded(("model",), nnx.initializers.zeros), rngs=rngs,
        )  # fmt: skip
        self.down = nnx.Linear(4 * d, d, kernel_init=sharded(("model", "data")), rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        d = args.d_model
        self.embed = nnx.Embed(
            VOCAB, d, embedding_init=sharded(("model", "data"), nnx.initializers.normal(0.02)),
            rngs=rngs,
        )  # fmt: skip
        self.pos = nnx.Param(
            sharded((None, "data"), nnx.initializers.normal(0.02))(rngs.params(), (args.seq_len, d))
        )
        self.blocks = nnx.List([Block(d, args.num_heads, rngs) for _ in range(args.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))  # tied output projection


# --- Optimizer and step ---------------------------------------------------------------------

tx = came_optax.came(args.learning_rate, weight_decay=args.weight_decay)

with jax.set_mesh(mesh):
    # Created under the mesh, every annotated parameter is placed sharded at once, and
    # the optimizer state is created (and placed) from the sharded parameters.
    model = Transformer(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens, targets):
    def loss_fn(model):
        logits = model(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


# --- Loop -----------------------------------------------------------------------------------

batch_sharding = NamedSharding(mesh, P("data", None))
with jax.set_mesh(mesh):
    for step in range(1, args.steps + 1):
        tokens, targets = (jax.device_put(a, batch_sharding) for a in batch())
        loss = train_step(model, optimizer, tokens, targets)
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(loss):.3f}")

# --- Report ---------------------------------------------------------------------------------


def arrays(tree):
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return [
        v.get_value() if is_var(v) else v
        for v in jax.tree.leaves(tree, is_leaf=is_var)
        if v is not None
    ]


def bytes_per_device(tree):
    totals = dict.fromkeys(mesh.devices.flat, 0)
    for leaf in arrays(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return totals


params = nnx.state(model, nnx.Param)
opt_state = optimizer.opt_state
param_total = sum(x.nbytes for x in arrays(params))
state_total = sum(x.nbytes for x in arrays(opt_state))
print(
    f"\nparameters: {param_total / 1024:.1f} KiB in all; CAME state: {state_total / 1024:.1f} KiB "
    f"({state_total / param_total:.2f}x the parameters; AdamW's would be 2.00x)"
)
param_bytes, state_bytes = bytes_per_device(params), bytes_per_device(opt_state)
# Above an even split only by what is replicated: the small LayerNorm and bias leaves,
# and each statistic over the mesh axis of the axis it averages.
print(f"  an even split over {n_devices} devices: {param_total / n_devices / 1024:.1f} KiB and "
      f"{state_total / n_devices / 1024:.1f} KiB")  # fmt: skip
for device in mesh.devices.flat:
    print(
        f"  device {device.id}: parameters {param_bytes[device] / 1024:7.1f} KiB, "
        f"optimizer state {state_bytes[device] / 1024:7.1f} KiB"
    )

# The placement nnx.Optimizer produced is the one came_optax.state_shardings predicts,
# e.g. for jax.jit(out_shardings=...) or for restoring a checkpoint onto the mesh.
predicted = came_optax.state_shardings(tx, params)
for got, want in zip(arrays(opt_state), jax.tree.leaves(predicted), strict=True):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
# One kernel's state: every statistic is a tree with the parameters' structure.
came_state = opt_state[0]
kernel = model.blocks[0].up.kernel[...]
mu = came_state.mu["blocks"][0]["up"]["kernel"][...]
row = came_state.v_row["blocks"][0]["up"]["kernel"][...]
col = came_state.v_col["blocks"][0]["up"]["kernel"][...]
print(f"\nblocks[0].up.kernel {kernel.shape} sharded {kernel.sharding.spec}:")
print(f"  momentum         {mu.shape} sharded {mu.sharding.spec}")
print(f"  row statistic    {row.shape} sharded {row.sharding.spec}")
print(f"  column statistic {col.shape} sharded {col.sharding.spec}")
