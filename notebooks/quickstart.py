# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # came_optax quickstart
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/came-optax/came_optax/blob/main/notebooks/quickstart.ipynb)
#
# CAME (Luo et al., ACL 2023, [arXiv:2307.02047](https://arxiv.org/abs/2307.02047)) keeps
# Adafactor's factored second moment, adds momentum, and scales that momentum by a factored
# estimate of how much it disagrees with the current update. Its state is about half of
# Adam's. `came_optax.came` is an ordinary optax `GradientTransformation`; this notebook shows:
#
# 1. one update by hand, and what the state holds;
# 2. CAME inside an optax chain, and the chain CAME itself is;
# 3. learning-rate schedules and injected hyperparameters;
# 4. weight-decay masks and bfloat16 options;
# 5. training a small Flax NNX classifier on scikit-learn's bundled digits;
# 6. optimizer-state memory next to AdamW and Adafactor.
#
# Everything runs on a CPU in well under a minute, offline.

# %%
import sys

# On Colab only: came_optax from its source repository (named in the README), with the
# "examples" extra, which brings flax and scikit-learn.
if "google.colab" in sys.modules:
    from IPython import get_ipython

    get_ipython().run_line_magic(
        "pip", 'install -q "came-optax[examples] @ git+https://github.com/came-optax/came_optax"'
    )

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import came_optax

print("jax", jax.__version__, "| optax", optax.__version__, "| devices", jax.devices())

# %% [markdown]
# ## 1. One update
#
# `came(learning_rate)` is used like `optax.adamw`: `init` builds the state from the
# parameters, `update` turns gradients into updates.

# %%
params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}


def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


x = jax.random.normal(jax.random.key(0), (32, 4))
y = x[:, :3] - 0.5 * x[:, 1:] + 1.0
tx = came_optax.came(learning_rate=1e-2)
state = tx.init(params)
grads = jax.grad(loss_fn)(params, x, y)
updates, state = tx.update(grads, state, params)
params = optax.apply_updates(params, updates)
print(jax.tree.map(jnp.shape, state))

# %% [markdown]
# The printout shows the shape of every array in the state. The state is a tuple with an
# entry per stage of the chain that `came()` is (stages that keep nothing print as
# `EmptyState()`), and its fields say what they hold:
#
# * `mu`, the momentum, has the parameters' shapes: it is the largest part of the state;
# * the `(4, 3)` matrix `w` is factored: its second moment is kept as a row statistic
#   `v_row` of shape `(4,)` and a column statistic `v_col` of shape `(3,)`, and its
#   instability likewise as `r_row` and `r_col`;
# * leaves that are not factored, such as the vector `b`, keep a full statistic `v` of
#   their own shape and skip the instability; their row and column fields hold only a
#   placeholder (as `v` does for the factored `w`);
# * `count` is the number of steps taken.
#
# A short training loop under `jax.jit`:


# %%
@jax.jit
def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


for i in range(301):
    params, state, loss = step(params, state, x, y)
    if i % 100 == 0:
        print(f"step {i:3d}  loss {loss:.2e}")

# %% [markdown]
# ## 2. In an optax chain
#
# CAME composes with any other transformation, for example global-norm clipping of the raw
# gradients or gradient accumulation (`optax.MultiSteps` returns zero updates until it has
# accumulated four gradients):

# %%
clipped = optax.chain(optax.clip_by_global_norm(1.0), came_optax.came(1e-3))
accumulating = optax.MultiSteps(came_optax.came(1e-3), every_k_schedule=4)
grads = jax.grad(loss_fn)(params, x, y)
for name, tx in [("clipped", clipped), ("accumulating", accumulating)]:
    updates, _ = tx.update(grads, tx.init(params), params)
    print(f"{name:12s} first update norm {optax.tree.norm(updates):.2e}")

# %% [markdown]
# `came()` is itself a chain of small stages, each usable alone: the factored
# second-moment scaling, a per-leaf RMS clip, confidence-guided momentum, decoupled weight
# decay and the learning rate. Building it by hand gives the same updates:

# %%
by_hand = optax.chain(
    came_optax.scale_by_factored_second_moment(b2=0.999, eps1=1e-30),
    optax.clip_by_block_rms(1.0),
    came_optax.scale_by_confidence(b1=0.9, b3=0.9999, eps2=1e-16),
    optax.add_decayed_weights(0.0),
    optax.scale_by_learning_rate(1e-3),
)
alias = came_optax.came(1e-3)
by_hand_updates, _ = by_hand.update(grads, by_hand.init(params), params)
alias_updates, _ = alias.update(grads, alias.init(params), params)
jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), by_hand_updates, alias_updates
)
print("same updates")

# %% [markdown]
# ## 3. Schedules and injected hyperparameters
#
# `learning_rate` takes an optax schedule. Wrapping `came` in `optax.inject_hyperparams`
# stores `learning_rate`, `b1`, `b2`, `b3`, `weight_decay` and `clip_threshold` in the state,
# where they can be read (for logging) or changed between steps without recompiling.

# %%
schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1e-3, warmup_steps=10, decay_steps=100
)
tx = optax.inject_hyperparams(came_optax.came)(learning_rate=schedule, weight_decay=1e-2)
state = tx.init(params)
for _ in range(5):
    updates, state = tx.update(jax.grad(loss_fn)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
print(f"learning rate of the 5th step: {state.hyperparams['learning_rate']:.1e}")

state.hyperparams["weight_decay"] = jnp.asarray(0.0)  # e.g. switch decay off mid-run
updates, state = tx.update(jax.grad(loss_fn)(params, x, y), state, params)

# %% [markdown]
# ## 4. Weight-decay masks and bfloat16
#
# As in `optax.adamw`, `mask` selects the leaves that are decayed: a pytree of booleans, or
# a function of the parameters returning one. Here only matrices are decayed. With zero
# gradients CAME's update is the weight decay alone, so the bias stays where it is:


# %%
def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


tx = came_optax.came(1e-1, weight_decay=0.5, mask=decay_mask)
zeros = jax.tree.map(jnp.zeros_like, params)
params_with_bias = {"w": params["w"], "b": jnp.ones(3)}
updates, _ = tx.update(zeros, tx.init(params_with_bias), params_with_bias)
print("update of w / w:", np.unique(np.round(updates["w"] / params_with_bias["w"], 6)))
print("b untouched:", bool(jnp.all(updates["b"] == 0)))

# %% [markdown]
# Under `optax.inject_hyperparams` a callable mask would be taken for a schedule: list it in
# `static_args`.
#
# Two options save memory with bfloat16:
#
# * `mu_dtype="bfloat16"` stores the momentum, most of CAME's state, in bfloat16 (pass it as
#   a string, or in `static_args`, under `inject_hyperparams`);
# * with bfloat16 *parameters*, give `inject_hyperparams` `hyperparam_dtype=jnp.float32`:
#   otherwise it stores the hyperparameters in the parameters' dtype and `b3=0.9999`
#   rounds to exactly 1.0 in bfloat16, freezing the instability estimate.
#
# All of CAME's arithmetic is float32 whatever the parameter dtype; updates come back in
# each parameter's dtype.

# %%
tx = optax.inject_hyperparams(came_optax.came, static_args=("mask",), hyperparam_dtype=jnp.float32)(
    learning_rate=1e-3, weight_decay=1e-2, mask=decay_mask, mu_dtype="bfloat16"
)
bf16_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
state = tx.init(bf16_params)
updates, state = tx.update(jax.tree.map(jnp.ones_like, bf16_params), state, bf16_params)
print("b3 stored as", state.hyperparams["b3"], state.hyperparams["b3"].dtype)
print("momentum dtype", optax.tree.get(state, "mu")["w"].dtype)
print("update dtype", updates["w"].dtype)

# %% [markdown]
# ## 5. Training a Flax NNX model
#
# A two-layer MLP on scikit-learn's 8x8 digits (the data ships with scikit-learn, so no
# download). `nnx.Optimizer` takes any optax transformation. CAME's updates are larger than
# Adam's early on (see `came`'s docstring), so its learning rate is usually several times
# smaller than AdamW's.

# %%
digits = load_digits()
images = (digits.data / 16.0).astype(np.float32)
labels = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(labels))
train_idx, test_idx = order[:1500], order[1500:]


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 256, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


model = MLP(nnx.Rngs(0))
optimizer = nnx.Optimizer(
    model, came_optax.came(2e-4, weight_decay=1e-2, mask=decay_mask), wrt=nnx.Param
)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


rng = np.random.default_rng(1)
for epoch in range(1, 11):
    for batch in np.array_split(rng.permutation(train_idx), len(train_idx) // 100):
        loss = train_step(model, optimizer, images[batch], labels[batch])
    if epoch % 2 == 0:
        acc = accuracy(model, images[test_idx], labels[test_idx])
        print(f"epoch {epoch:2d}  train loss {loss:.3f}  test accuracy {acc:.3f}")

# %% [markdown]
# ## 6. State memory
#
# `jax.eval_shape(tx.init, params)` gives the state's shapes without allocating anything,
# so the state of any model can be sized from `jax.ShapeDtypeStruct` leaves. CAME keeps a
# full momentum plus row and column statistics: about half of AdamW's two full moments.
# `optax.adafactor` keeps no momentum by default and is smaller still, but it does not
# factor matrices with a side under 128, which is why it is not small on the MLP.


# %%
def state_bytes(tx, params):
    state = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


optimizers = {
    "came": came_optax.came(1e-3),
    "came, bf16 mu": came_optax.came(1e-3, mu_dtype=jnp.bfloat16),
    "adamw": optax.adamw(1e-3),
    "adafactor": optax.adafactor(1e-3),
}
models = {
    "digits MLP": nnx.state(model, nnx.Param),
    "4096x16384 MLP": {
        "up": jax.ShapeDtypeStruct((4096, 16384), jnp.float32),
        "down": jax.ShapeDtypeStruct((16384, 4096), jnp.float32),
    },
}
for name, model_params in models.items():
    adamw = state_bytes(optimizers["adamw"], model_params)
    print(name)
    for opt_name, tx in optimizers.items():
        size = state_bytes(tx, model_params)
        print(f"  {opt_name:14s} {size / 2**20:10.3f} MiB  {size / adamw:.4f}x adamw")

# %% [markdown]
# `benchmarks/memory.py` in the repository prints the same comparison for GPT-2 small and
# medium and ViT-B/16. For a side-by-side training run with loss curves see
# `came_vs_adamw.ipynb`.
