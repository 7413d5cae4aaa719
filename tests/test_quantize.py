"""mu_dtype='int8': the blockwise absmax quantizer and the int8 momentum built on it.

The quantizer (``came_optax/_quantize.py``) is checked against a NumPy oracle of its blocks;
the optimizer's int8 momentum against a float32 momentum fed the same updates, against
AdamW's state size on GPT-2 small, across an orbax checkpoint, and on 8 simulated devices
(this file run as a script in a subprocess, so this process keeps one device).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import gpt2_small, loss_step, restore_target, run_python, state_bytes, tree_digest

import came_optax
from came_optax import _quantize

# Leaf shapes and the blocks the rule gives them: 16x16 tiles, a leading axis, tiles that
# fit other sides (a GPT-2 embedding's odd vocabulary: one row of 256), a vector's run of 256.
BLOCKS = {
    (64, 128): (16, 16),
    (3, 32, 256): (1, 16, 16),
    (256, 24): (32, 8),
    (33, 768): (1, 256),
    (8192,): (256,),
}


def _momentum_like(shape, seed=0) -> np.ndarray:
    """Normal values whose scale varies by 40 decades across rows, with exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    rows = 10.0 ** rng.uniform(-20, 20, shape[:-1] + (1,)) if len(shape) > 1 else 1.0
    x = x * rows
    x[rng.random(shape) < 0.05] = 0.0
    return x.astype(np.float32)


def _block_view(x: np.ndarray, block) -> np.ndarray:
    """x with each block's elements gathered on the last axis: shape (*scale_shape, 256)."""
    split = x.reshape(sum(((n // b, b) for n, b in zip(x.shape, block, strict=True)), ()))
    order = list(range(0, split.ndim, 2)) + list(range(1, split.ndim, 2))
    return split.transpose(order).reshape(_quantize.scale_shape(x.shape, block) + (-1,))


@pytest.mark.parametrize(
    "shape, block",
    [
        *BLOCKS.items(),
        ((4095,), None),  # under 4096 elements: float32
        ((64, 63), None),  # 16 * 252 elements: float32
        ((8, 4096), (8, 32)),
        ((3, 5000), None),  # no tile of 256 divides (3, 5000)
        ((50257, 768), (1, 256)),  # GPT-2 small's token embedding
        ((768, 2304), (16, 16)),
        ((), None),
    ],
)
def test_block_rule(shape, block):
    assert _quantize.block_shape(shape) == block
    if block is not None:
        assert math.prod(block) == _quantize.BLOCK_ELEMENTS


@pytest.mark.parametrize("shape", list(BLOCKS), ids=str)
def test_round_trip_error_is_at_most_half_a_level(shape):
    block = _quantize.block_shape(shape)
    x = _momentum_like(shape)
    q, scale = jax.jit(_quantize.quantize, static_argnums=1)(x, block)
    assert q.dtype == jnp.int8 and q.shape == shape
    assert scale.dtype == jnp.float32 and scale.shape == _quantize.scale_shape(shape, block)
    absmax = np.abs(_block_view(x, block)).max(axis=-1)
    np.testing.assert_array_equal(scale, absmax * np.float32(1 / 127))
    assert np.abs(np.asarray(q, np.int32)).max() == 127
    error = np.abs(np.asarray(_quantize.dequantize(q, scale, block), np.float64) - x)
    # Half a level, plus the float32 rounding of the scale and of the product.
    bound = absmax.astype(np.float64) / 254 * (1 + 2**-20)
    assert np.all(_block_view(error, block) <= bound[..., None])


@pytest.mark.parametrize("shape", list(BLOCKS), ids=str)
def test_quantizing_a_dequantized_array_changes_nothing(shape):
    block = _quantize.block_shape(shape)
    q, scale = _quantize.quantize(jnp.asarray(_momentum_like(shape, seed=1)), block)
    again = _quantize.quantize(_quantize.dequantize(q, scale, block), block)
    np.testing.assert_array_equal(again[0], q)
    # 127 s, times float32(1/127), may land one unit in the last place away from s.
    np.testing.assert_allclose(again[1], scale, rtol=2**-23, atol=0)


def test_zero_blocks_stay_exactly_zero():
    x = _momentum_like((64, 128), seed=2)
    x[:16, :16] = 0.0  # a whole block
    x[16:32, :16] = 0.0
    x[16, 0] = -1e-30  # a block with one tiny value among zeros
    q, scale = _quantize.quantize(jnp.asarray(x), (16, 16))
    assert float(scale[0, 0]) == 0.0 and not np.any(np.asarray(q[:16, :16]))
    back = np.asarray(_quantize.dequantize(q, scale, (16, 16)))
    assert np.all(np.isfinite(back))
    np.testing.assert_array_equal(back[:32, :16][x[:32, :16] == 0], 0.0)
    assert back[16, 0] == np.float32(-1e-30)  # the block's absmax comes back exactly


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.mark.parametrize("shape", [s for s in BLOCKS if _quantize._row_groups(BLOCKS[s])], ids=str)
def test_tpu_layout_quantizes_like_the_tiles_bit_for_bit(shape):
    """A TPU's program (8-row groups, reduce-windows), run here, gives the tiles' values."""
    block = BLOCKS[shape]
    tiles = _quantize._tiles(shape, block, None)
    rows = _quantize._rows(_quantize._row_groups(block), None)
    x = _momentum_like(shape, seed=4)
    x.reshape(-1)[[5, 700]] = np.nan, np.inf
    x[..., -block[-2] :, -block[-1] :] = 0.0  # a block of zeros
    q, scale = jax.jit(lambda x: _quantize._quantize(x, tiles))(x)
    assert np.isinf(scale).any() and (np.asarray(scale) == 0).any()
    on_tpu = jax.jit(lambda x: _quantize._quantize(x, rows))(x)
    np.testing.assert_array_equal(_bits(on_tpu[0]), _bits(q))
    np.testing.assert_array_equal(_bits(on_tpu[1]), _bits(scale))
    dequantize = jax.jit(_quantize._dequantize, static_argnums=(2, 3))
    for dtype in (jnp.float32, jnp.bfloat16):
        back = dequantize(q, scale, dtype, tiles)
        np.testing.assert_array_equal(_bits(dequantize(q, scale, dtype, rows)), _bits(back))


def _confidence_run(mu_dtype, updates):
    """scale_by_confidence fed fixed updates: its momentum does not depend on its output."""
    tx = came_optax.scale_by_confidence(0.9, mu_dtype=mu_dtype)
    state = tx.init(updates[0])
    update = jax.jit(tx.update)
    states = []
    for u in updates:
        state = update(u, state)[1]
        states.append(state)
    return states


def test_int8_momentum_error_is_a_geometric_sum_of_half_levels():
    """e_t = b1 (e_{t-1} + d_{t-1}) with |d| <= scale / 2: |e_t| <= b1 / (1 - b1) max scale / 2."""
    rng = np.random.default_rng(3)
    shape, block = (64, 128), (16, 16)
    updates = [jnp.asarray(rng.standard_normal(shape) + 0.3, jnp.float32) for _ in range(30)]
    exact = _confidence_run(None, updates)
    quantized = _confidence_run("int8", updates)
    max_scale = np.zeros(_quantize.scale_shape(shape, block), np.float32)
    for t, (f, q) in enumerate(zip(exact, quantized, strict=True)):
        assert q.mu.dtype == jnp.int8 and f.mu.dtype == jnp.float32
        error = np.abs(np.asarray(_quantize.dequantize(q.mu, q.mu_scale, block)) - f.mu)
        bound = 0.9 / 0.1 * max_scale / 2 * (1 + 1e-5) if t else 0.5 * np.asarray(q.mu_scale)
        assert np.all(_block_view(error, block) <= bound[..., None] + 1e-7), t
        max_scale = np.maximum(max_scale, q.mu_scale)


def test_gpt2_small_state_is_under_0_135_of_adamw():
    params = gpt2_small()
    came = state_bytes(came_optax.came(1e-4, mu_dtype="int8"), params)
    adamw = state_bytes(optax.adamw(1e-3), params)
    float32 = state_bytes(came_optax.came(1e-4), params)
    # The momentum: one byte and 4/256 bytes of scale per element of a quantized leaf.
    momentum = float32_momentum = 0
    for x in jax.tree.leaves(params):
        quantized = _quantize.block_shape(x.shape) is not None
        momentum += x.size * (1 + 4 / 256) if quantized else 4 * x.size + 4
        float32_momentum += 4 * x.size + 4
    assert came == float32 - float32_momentum + momentum
    assert came <= 0.135 * adamw, f"came int8 / adamw = {came / adamw:.4f}"


@pytest.mark.parametrize(
    "mu_dtype", [jnp.int32, "uint8", jnp.int16, "int4", bool], ids=lambda d: str(d)
)
def test_other_integer_mu_dtypes_raise_naming_mu_dtype_and_int8(mu_dtype):
    with pytest.raises(ValueError, match=r"mu_dtype must be a floating or complex dtype or 'int8'"):
        came_optax.came(1e-3, mu_dtype=mu_dtype)
    with pytest.raises(ValueError, match="mu_dtype"):
        came_optax.scale_by_confidence(mu_dtype=mu_dtype)


def test_int8_momentum_of_a_complex_parameter_raises_naming_the_leaf():
    tx = came_optax.came(1e-3, mu_dtype="int8")
    with pytest.raises(
        ValueError, match=r"mu_dtype=int8 cannot hold the complex momentum of \['z'\]"
    ):
        tx.init({"z": jnp.zeros((64, 64), jnp.complex64)})


def test_inject_hyperparams_takes_int8_as_a_string_or_a_static_argument():
    params = {"w": jnp.asarray(_momentum_like((64, 64), seed=4) * 0 + 1.0)}
    grads = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((64, 64)), jnp.float32)}
    by_name = optax.inject_hyperparams(came_optax.came)(1e-2, mu_dtype="int8")
    static = optax.inject_hyperparams(came_optax.came, static_args=("mu_dtype",))(
        1e-2, mu_dtype=jnp.int8
    )
    states = []
    for tx in (by_name, static):
        state = tx.init(params)
        for _ in range(2):
            state = jax.jit(tx.update)(grads, state, params)[1]
        states.append(state.inner_state[0])
    assert states[0].mu["w"].dtype == jnp.int8
    assert tree_digest(states[0]) == tree_digest(states[1])
    # The class itself would be read as a schedule: a clear error, not a silent cast.
    with pytest.raises(ValueError, match="mu_dtype"):
        optax.inject_hyperparams(came_optax.came)(1e-2, mu_dtype=jnp.int8).init(params)


def test_linen_boxes_stay_on_the_int8_momentum_only():
    nn = pytest.importorskip("flax.linen")
    params = {"kernel": nn.Partitioned(jnp.ones((64, 128)), names=("embed", "mlp"))}
    state = came_optax.came(1e-3, mu_dtype="int8").init(params)[0]
    assert isinstance(state.mu["kernel"], nn.Partitioned)
    assert state.mu["kernel"].names == ("embed", "mlp")
    assert state.mu["kernel"].value.dtype == jnp.int8
    assert state.mu_scale["kernel"].shape == (4, 8)  # a plain array: the box's names would lie


# A small model whose three matrices are quantized (one with 1x256 blocks) and whose bias is not.
TRAIN_SHAPES = {"w1": (32, 256), "w2": (256, 32), "emb": (33, 256), "b1": (256,)}


def _train_params() -> dict:
    rng = np.random.default_rng(6)
    return {
        k: jnp.asarray(rng.standard_normal(s) / 8, jnp.float32) for k, s in TRAIN_SHAPES.items()
    }


def _loss(params, t):
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
        params = jax.tree.map(lambda p: jax.sharding.reshard(p, jax.P()), params)
    x = jnp.sin(jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) + t)
    h = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return jnp.mean((h - jnp.cos(x)) ** 2) + jnp.mean(jnp.square(params["emb"]))


TRAIN_TX = came_optax.came(1e-2, weight_decay=0.1, mu_dtype="int8", debias=True)


_train_step = loss_step(TRAIN_TX, _loss)


def _train(params, steps, start=0, state=None):
    if state is None:
        state = jax.jit(TRAIN_TX.init)(params)
    for t in range(start, start + steps):
        params, state = _train_step(params, state, t)
    return params, state


def test_resume_from_an_orbax_checkpoint_is_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = jax.device_put(_train_params(), jax.devices()[0])
    uninterrupted = _train(params, 6)
    saved = _train(params, 3)
    assert saved[1][0].mu["w1"].dtype == jnp.int8
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "step3", saved)
    target = restore_target((params, jax.eval_shape(TRAIN_TX.init, params)))
    with ocp.StandardCheckpointer() as checkpointer:
        restored, state = checkpointer.restore(tmp_path / "step3", target)
    assert tree_digest((restored, state)) == tree_digest(saved)
    assert tree_digest(_train(restored, 3, start=3, state=state)) == tree_digest(uninterrupted)


# ------------------------------------------------------------------------ on 8 devices

# Shards of 16x64 and 64x16 for the 16x16 blocks; the 1x256 blocks' rows are replicated.
SPECS = {"w1": ("data", "model"), "w2": ("model", "data"), "emb": (), "b1": ("model",)}


def _eight_device_report() -> dict:
    """Quantizer and training on 2x4 meshes (auto and explicit axes) against one device."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    params = _train_params()
    x = jnp.asarray(_momentum_like((64, 128), seed=7))
    single_q = _quantize.quantize(x, (16, 16))
    single = _train(params, 3)
    report = {"devices": jax.device_count()}
    for kind, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            q, scale = jax.jit(_quantize.quantize, static_argnums=1)(
                jax.device_put(x, P("data", "model")), (16, 16)
            )
            placed = {k: jax.device_put(p, P(*SPECS[k])) for k, p in params.items()}
            shardings = came_optax.state_shardings(TRAIN_TX, placed)
            state = jax.jit(TRAIN_TX.init, out_shardings=shardings)(placed)
            new_params, state = _train(placed, 3, state=state)
            try:
                # 8 columns per shard of 16x16 blocks: a block would straddle two shards.
                wide = jax.device_put(jnp.zeros((64, 64)), P(None, ("data", "model")))
                jax.jit(_quantize.quantize, static_argnums=1)(wide, (16, 16))
                straddle = "no error"
            except ValueError as e:
                straddle = str(e)
        came, declared = state[0], shardings[0]

        def like_param(tree, k, mesh=mesh):
            sharding = getattr(tree[k], "sharding", tree[k])
            return sharding.is_equivalent_to(NamedSharding(mesh, P(*SPECS[k])), 2)

        quantized = [k for k in params if k != "b1"]
        report[kind] = {
            "quantizer_equal": tree_digest((q, scale)) == tree_digest(single_q),
            "scale_like_x": scale.sharding.is_equivalent_to(
                NamedSharding(mesh, P("data", "model")), 2
            ),
            "mu_like_params": all(like_param(came.mu, k) for k in params),
            "mu_int8": [k for k in params if came.mu[k].dtype == jnp.int8],
            "scales_like_params": all(like_param(came.mu_scale, k) for k in quantized),
            "declared_like_params": all(like_param(declared.mu_scale, k) for k in quantized),
            "param_error": max(
                float(jnp.max(jnp.abs(new_params[k] - single[0][k]))) for k in params
            ),
            "mu_level_diff": max(
                int(jnp.max(jnp.abs(came.mu[k].astype(jnp.int32) - single[1][0].mu[k])))
                for k in quantized
            ),
            "straddle": straddle,
        }
    report["nnx"] = _nnx_sharded_kernel()
    return report


def _nnx_sharded_kernel() -> dict:
    """One nnx.Optimizer step of a kernel annotated with nnx.with_partitioning, on a 2x4 mesh."""
    from flax import nnx

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
        model = nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, came_optax.came(1e-2, mu_dtype="int8"), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x):
            optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

        step(model, optimizer, jnp.ones((8, 64)))
    mu_box = optimizer.opt_state[0].mu["kernel"]
    mu, scale = mu_box[...], optimizer.opt_state[0].mu_scale["kernel"][...]
    return {
        "mu": [str(mu.dtype), str(mu.sharding.spec)],
        "mu_names": list(mu_box.get_metadata().get("out_sharding") or ()),
        "scale": [list(scale.shape), str(scale.sharding.spec)],
    }


@pytest.mark.multidevice
def test_eight_devices_quantize_and_train_like_one():
    result = run_python([__file__], devices=8, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for kind in ("auto", "explicit"):
        r = report[kind]
        assert r["quantizer_equal"], kind  # absmax and rounding are exact: bit for bit
        assert r["scale_like_x"], kind
        assert r["mu_int8"] == ["w1", "w2", "emb"], kind
        assert r["mu_like_params"] and r["scales_like_params"], kind
        assert r["declared_like_params"], kind  # state_shardings says so ahead of time
        # Sharded means sum in another order. Float32 rounding may move an element across a
        # rounding boundary of int8: at most one level (1/127 of its block's largest momentum),
        # which moves the later updates by far less than a tenth of a step (lr = 1e-2).
        assert r["mu_level_diff"] <= 1, kind
        bound = 1e-6 if r["mu_level_diff"] == 0 else 0.1 * 1e-2
        assert r["param_error"] < bound, (kind, r["param_error"])
    assert "straddle two shards" in report["explicit"]["straddle"]
    # nnx: the int8 momentum keeps the kernel's annotation; the 16x16 blocks' scales shard alike.
    spec = str(jax.sharding.PartitionSpec("data", "model"))
    assert report["nnx"]["mu"] == ["int8", spec]
    assert report["nnx"]["mu_names"] == ["data", "model"]
    assert report["nnx"]["scale"] == [[4, 8], spec]


if __name__ == "__main__":
    print(json.dumps(_eight_device_report()))
