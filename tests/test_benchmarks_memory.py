"""The memory planner's per-device bytes, and the training step that benchmarks/fit_tpu.py compiles.

``benchmarks/memory.py`` computes each device's bytes from ``NamedSharding.shard_shape``
without allocating anything; here the same parameters and states are allocated on 1 and on 8
simulated CPU devices (in a fresh process, so this one keeps one device) and the bytes each
device holds are counted from its shards. ``benchmarks/fit_tpu.py`` compiles a training step
over the forward of ``benchmarks/_models.py``; here that forward is checked against a NumPy
cross-entropy and for causality, and the step trains tiny models on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import models, run_python

# Tiny models in which every leaf has an axis that 8 divides and every int8 block scale of an
# 8-way shard is whole: each parameter is split 8 ways and nothing falls back to replicated.
# (builder in benchmarks/_models.py, positional and keyword arguments)
TINY = {
    "gpt2": ("gpt2", (128, 2), {"vocab": 512, "context": 64}),
    "llama": ("llama", (128, 2), {"mlp": 256, "vocab": 512}),
}
VOCAB, HEAD_DIM = 512, 32


def tiny_source(name: str) -> str:
    builder, args, kwargs = TINY[name]
    return f"_models.{builder}(*{args!r}, **{kwargs!r})"


def fill(template: str, **values) -> str:
    """``template`` with each ``__KEY__`` replaced by ``str(values[KEY])``."""
    for key, value in values.items():
        template = template.replace(f"__{key}__", str(value))
    return template


def tiny_shapes(name: str) -> dict:
    builder, args, kwargs = TINY[name]
    return getattr(models(), builder)(*args, **kwargs)


_PLANNER = """
import json, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import _models, memory, came_optax
meshes = [memory.mesh(1), memory.mesh(8)]
out = {}
for model, shapes in __MODELS__.items():
    for setup, (tx, dtype) in memory.SETUPS.items():
        for m, planned in zip(meshes, memory.plan(tx, shapes, dtype, meshes)):
            params = jax.tree.map(
                lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding),
                memory.placed(shapes, dtype, m),
            )
            shardings = came_optax.state_shardings(tx, params)
            state = jax.jit(tx.init, out_shardings=shardings)(params)
            held = lambda tree: [
                sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                    if s.device == d)
                for d in m.devices.flat
            ]
            out[f"{model}|{setup}|{m.devices.size}"] = {
                "planned": planned, "params": held(params), "state": held(state),
                "total_params": _models.num_params(shapes) * jnp.dtype(dtype).itemsize,
            }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def held_bytes() -> dict:
    script = fill(_PLANNER, MODELS="{" + ", ".join(f"{k!r}: {tiny_source(k)}" for k in TINY) + "}")
    result = run_python(["-c", script], devices=8, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows(held_bytes: dict, model: str, devices: int) -> dict[str, dict]:
    """The planner's and the devices' bytes for every setup of ``model`` on ``devices``."""
    out = {}
    for key, row in held_bytes.items():
        name, setup, n = key.split("|")
        if name == model and int(n) == devices:
            out[setup] = row
    assert len(out) == len({key.split("|")[1] for key in held_bytes}), sorted(out)
    return out


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("model", sorted(TINY))
def test_planned_bytes_per_device_are_what_each_device_holds(held_bytes, model, devices):
    for setup, row in rows(held_bytes, model, devices).items():
        planned = row["planned"]
        assert planned["replicated"] == 0, setup
        assert row["params"] == [planned["params"]] * devices, setup
        assert row["state"] == [planned["state"]] * devices, setup
        # FSDP: every parameter is split over all the devices.
        assert planned["params"] * devices == row["total_params"], setup


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("model", sorted(TINY))
def test_adamw_state_per_device_is_two_parameter_shards_and_a_count(held_bytes, model, devices):
    row = rows(held_bytes, model, devices)["adamw, fp32 params"]
    # mu and nu are sharded like the float32 parameters; the int32 step count is replicated.
    assert row["planned"]["state"] == 2 * row["total_params"] // devices + 4


# --- The forward of benchmarks/_models.py -------------------------------------------------------


def tiny_params(name: str) -> dict:
    shapes = tiny_shapes(name)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=models().is_shape)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            (1.0 if len(s) == 1 else 0.0) + 0.1 * jax.random.normal(k, s)
            for k, s in zip(keys, leaves, strict=True)
        ],
    )


def logits(params: dict, x: jax.Array) -> jax.Array:
    """The float32 logits of ``x``, compiled once per model."""
    fn = functools.partial(models().logits, head_dim=HEAD_DIM, dtype=jnp.float32, remat=False)
    return jax.jit(fn)(params, x)


def tokens(seed: int, shape=(2, 17)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def layers_key(params: dict) -> str:
    return "blocks" if "blocks" in params else "layers"


def stack_layers(tree: dict) -> dict:
    """``tree`` with its list of per-layer trees stacked along a leading layer axis."""
    key = layers_key(tree)
    return {**tree, key: jax.tree.map(lambda *a: jnp.stack(a), *tree[key])}


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_at_a_position_depend_only_on_earlier_tokens(name):
    params, x = tiny_params(name), tokens(1, (2, 16))
    changed = x.at[:, 8:].set((x[:, 8:] + 1) % VOCAB)
    a, b = (logits(params, t) for t in (x, changed))
    np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert np.abs(a[:, 8] - b[:, 8]).max() > 1e-3


@pytest.mark.parametrize("name", sorted(TINY))
def test_loss_is_the_cross_entropy_of_the_next_token(name):
    params, x = tiny_params(name), tokens(2)
    z = np.asarray(logits(params, x[:, :-1]), np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.asarray(x[:, 1:, None]), -1).mean()
    loss = models().causal_lm_loss(params, x, head_dim=HEAD_DIM, dtype=jnp.float32, remat=False)
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_remat_and_scanned_layers_give_the_same_gradient(name):
    params, x = tiny_params(name), tokens(3)

    def grad(p, remat):
        loss = lambda p: models().causal_lm_loss(
            p, x, head_dim=HEAD_DIM, dtype=jnp.float32, remat=remat
        )
        return jax.jit(jax.grad(loss))(p)

    plain = grad(params, remat=False)
    for got, want in [
        (grad(params, remat=True), plain),
        (grad(stack_layers(params), remat=True), stack_layers(plain)),
    ]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            # float32 sums in another order: within 2e-5 of the leaf's largest entry.
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())


# --- The training step of benchmarks/fit_tpu.py -------------------------------------------------

# The fit script's step, with its two main setups' optimizers at learning rates that learn a
# simple rule in a few steps.
STEPS = 20
_TRAIN = """
import json, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
import optax
import _models, came_optax, fit_tpu
setups = {
    "adamw, fp32 params": (optax.adamw(1e-2), jnp.float32),
    "came int8 mu, bf16 params + SR": (
        came_optax.came(1e-3, mu_dtype="int8", stochastic_rounding=True), jnp.bfloat16
    ),
}
shapes = __MODEL__
leaves, treedef = jax.tree.flatten(shapes, is_leaf=_models.is_shape)
keys = jax.random.split(jax.random.key(1), len(leaves))
# Each next token is the current one plus one: a rule the model can learn in a few steps.
starts = jax.random.randint(jax.random.key(0), (4, 1), 0, __VOCAB__)
tokens = (starts + jnp.arange(33)) % __VOCAB__
out = {}
for setup, (tx, dtype) in setups.items():
    params = jax.tree.unflatten(treedef, [
        (jnp.ones(s) if len(s) == 1 else 0.01 * jax.random.normal(k, s)).astype(dtype)
        for k, s in zip(keys, leaves)
    ])
    step = jax.jit(fit_tpu.train_step(tx, head_dim=__HEAD_DIM__), donate_argnums=(0, 1))
    state, losses = tx.init(params), []
    for _ in range(__STEPS__):
        params, state, loss = step(params, state, tokens)
        losses.append(float(loss))
    out[setup] = losses
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_fit_training_step_learns_a_batch_on_cpu(name):
    script = fill(_TRAIN, MODEL=tiny_source(name), VOCAB=VOCAB, HEAD_DIM=HEAD_DIM, STEPS=STEPS)
    result = run_python(["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(losses) == 2, sorted(losses)
    for setup, curve in losses.items():
        # The first loss is that of near-uniform logits; 20 steps take off at least a fifth.
        assert abs(curve[0] - np.log(VOCAB)) < 0.05, (setup, curve[0])
        assert curve[-1] < 0.8 * curve[0], (setup, curve)


_COMPILE = """
import json, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
import optax
from jax.sharding import NamedSharding, PartitionSpec
import _models, accelerators, came_optax, fit_tpu
sharding = NamedSharding(accelerators.mesh(fit_tpu.TARGET), PartitionSpec())
tx = came_optax.came(1e-3, mu_dtype="int8", stochastic_rounding=True)
small = __MODEL__
fits = fit_tpu.compile_step(tx, small, jnp.bfloat16, __HEAD_DIM__, sharding, batch=2, seq_len=64)
fits["donated"] = fit_tpu.donated_bytes(tx, small, jnp.bfloat16)
# 1.1B float32 parameters in one embedding: with AdamW, 16 GiB of parameters, gradients and state.
big = _models.gpt2(4096, 1, vocab=262144, context=64)
adamw = optax.adamw(1e-3)
refused = fit_tpu.compile_step(adamw, big, jnp.float32, 64, sharding, batch=2, seq_len=64)
refused["donated"] = fit_tpu.donated_bytes(adamw, big, jnp.float32)
print(json.dumps({"fits": fits, "refused": refused}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' of jax's version",
)
def test_fit_compile_for_a_v5e_chip_donates_the_state_and_reports_what_does_not_fit():
    script = fill(_COMPILE, MODEL=tiny_source("gpt2"), HEAD_DIM=HEAD_DIM)
    result = run_python(["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    fits, refused = out["fits"], out["refused"]
    # Every parameter and state buffer is donated (TPU layouts pad small arrays); only the
    # token batch, 2 x 65 int32 padded to at most one 4 KiB tile, is not.
    assert fits["fits"] and fits["donated"] <= fits["alias"], fits
    assert 0 < fits["argument"] - fits["alias"] <= 4096, fits
    assert fits["alias"] <= fits["peak"] <= fits["total"], fits
    assert not refused["fits"], refused
    assert refused["donated"] < refused["needed"], refused
    assert refused["available"] < refused["needed"], refused
