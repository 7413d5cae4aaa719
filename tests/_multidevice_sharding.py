"""CAME on 8 simulated CPU devices: the state follows the parameters' shardings.

Not collected by a plain ``pytest`` run (the main process keeps one device);
``tests/test_sharding.py`` runs this module in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. To run it directly::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/_multidevice_sharding.py
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from helpers import reduced_spec
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import came_optax
from came_optax import state_shardings

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8",
        allow_module_level=True,
    )

pytestmark = pytest.mark.multidevice

AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
# (data, model) mesh shapes and axis types of the training comparisons.
MESH_CASES = [((2, 4), "auto"), ((2, 4), "explicit"), ((4, 2), "auto"), ((8, 1), "explicit")]
STEPS = 5
TOLERANCE = 1e-6

# FSDP ('data') and tensor-parallel ('model') placement of a small two-layer model
# with a three-axis head, a vector and a scalar.
SHAPES = {
    "w1": (16, 64),
    "b1": (64,),
    "w2": (64, 16),
    "heads": (16, 2, 8),
    "scale": (),
}
SPECS = {
    "w1": P("data", "model"),
    "b1": P("model"),
    "w2": P("model", "data"),
    "heads": P("data", None, "model"),
    "scale": P(),
}
# What each layer's activations are multiplied with: the kernel gathered over 'data'.
COMPUTE_SPECS = {"w1": P(None, "model"), "w2": P("model", None), "heads": P(None, None, "model")}


def mesh_case_id(case):
    return f"{case[0]}x{case[1]}" if isinstance(case, tuple) else case


def make_mesh(shape, axis_type):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AXIS_TYPES[axis_type],) * 2)


def init_params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    params = {
        name: 0.3 * jax.random.normal(key, shape)
        for (name, shape), key in zip(SHAPES.items(), keys, strict=True)
    }
    params["scale"] = jnp.ones(())
    return params


def batches():
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (STEPS, 16, 16))
    y = jax.random.normal(ky, (STEPS, 16, 2, 8))
    return x, y


def loss_fn(params, x, y, explicit):
    def use(name):
        w = params[name]
        return jax.sharding.reshard(w, COMPUTE_SPECS[name]) if explicit else w

    # With explicit axes the 'model'-contracting product names its output sharding.
    z_sharding = P("data", None) if explicit else None
    h = jnp.tanh(x @ use("w1") + params["b1"])
    z = jnp.einsum("bf,fd->bd", h, use("w2"), out_sharding=z_sharding)
    out = params["scale"] * jnp.einsum("bd,dhe->bhe", z, use("heads"))
    return jnp.mean((out - y) ** 2)


def place(tree, mesh, specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def train(tx, *, mesh=None, explicit=False):
    """STEPS steps of tx; on a mesh, with jit shardings taken from state_shardings."""

    def step(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb, explicit)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, (x, y) = init_params(), batches()
    if mesh is None:
        step = jax.jit(step)
        opt_state = jax.jit(tx.init)(params)
    else:
        params = place(params, mesh, SPECS)
        x, y = place((x, y), mesh, (P(None, "data"), P(None, "data")))
        param_shardings = jax.tree.map(lambda p: p.sharding, params)
        opt_shardings = state_shardings(tx, params)
        batch_sharding = NamedSharding(mesh, P("data"))
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        step = jax.jit(
            step,
            in_shardings=(param_shardings, opt_shardings, batch_sharding, batch_sharding),
            out_shardings=(param_shardings, opt_shardings),
            donate_argnums=(0, 1),
        )
    for i in range(STEPS):
        params, opt_state = step(params, opt_state, x[i], y[i])
    return params, opt_state


def training_tx():
    return came_optax.came(3e-3, weight_decay=1e-2)


@functools.cache
def unsharded_run():
    return train(training_tx())


@functools.cache
def sharded_run(mesh_shape, axis_type):
    mesh = make_mesh(mesh_shape, axis_type)
    with jax.set_mesh(mesh):
        params, opt_state = train(training_tx(), mesh=mesh, explicit=axis_type == "explicit")
    return mesh, params, opt_state


def expected_state_specs(tx_kwargs):
    """Per leaf (tree order), the specs of (mu, row, col, full) by CAME's rule."""
    out = []
    for name in sorted(SHAPES):
        shape, spec = SHAPES[name], SPECS[name]
        axes = came_optax.factored_axes(
            shape,
            tx_kwargs.get("factored_dims", "last_two"),
            tx_kwargs.get("min_dim_size_to_factor"),
        )
        if axes is None:
            out.append((spec, None, None, spec))
        else:
            row_axis, col_axis = axes
            ndim = len(shape)
            out.append(
                (spec, reduced_spec(spec, ndim, col_axis), reduced_spec(spec, ndim, row_axis), None)
            )
    return out


def assert_sharded_like(array, mesh, spec, what):
    expected = NamedSharding(mesh, spec)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (
        f"{what}: {array.sharding.spec} on {array.shape}, expected {spec}"
    )


def assert_came_state_sharding(state, mesh, tx_kwargs):
    came = state[0]
    leaves = {f: jax.tree.leaves(getattr(came, f)) for f in came._fields[1:]}
    for i, (mu_spec, row_spec, col_spec, full_spec) in enumerate(expected_state_specs(tx_kwargs)):
        assert_sharded_like(leaves["mu"][i], mesh, mu_spec, f"mu[{i}]")
        if row_spec is None:
            for name in ("v_row", "v_col", "r_row", "r_col"):
                assert leaves[name][i].shape == (1,)  # a placeholder
            assert_sharded_like(leaves["v"][i], mesh, full_spec, f"v[{i}]")
        else:
            assert leaves["v"][i].shape == (1,)
            for name, spec in [
                ("v_row", row_spec),
                ("v_col", col_spec),
                ("r_row", row_spec),
                ("r_col", col_spec),
            ]:
                assert_sharded_like(leaves[name][i], mesh, spec, f"{name}[{i}]")
    assert came.count.sharding.is_fully_replicated


LAST_TWO, LARGEST_TWO = {}, {"factored_dims": "largest_two"}
MIN_DIM_BF16 = {"min_dim_size_to_factor": 16, "mu_dtype": jnp.bfloat16}


@pytest.mark.parametrize(
    "axis_type, tx_kwargs",
    [
        ("auto", LAST_TWO),
        ("explicit", LAST_TWO),
        ("auto", LARGEST_TWO),
        ("explicit", LARGEST_TWO),
        ("auto", MIN_DIM_BF16),
    ],
    ids=[
        "auto-last_two",
        "explicit-last_two",
        "auto-largest_two",
        "explicit-largest_two",
        "auto-min_dim_bf16",
    ],
)
def test_jit_init_and_update_follow_param_sharding(axis_type, tx_kwargs):
    # Explicit axes carry each parameter's sharding into jit(init); with auto axes a constant
    # is tied to no input (optax.adam's zeros too), so the state's shardings are given.
    mesh = make_mesh((2, 4), axis_type)
    tx = came_optax.came(1e-2, **tx_kwargs)
    with jax.set_mesh(mesh):
        params = place(init_params(), mesh, SPECS)
        given = state_shardings(tx, params) if axis_type == "auto" else None
        state = jax.jit(tx.init, out_shardings=given)(params)
        assert_came_state_sharding(state, mesh, tx_kwargs)
        _, state = jax.jit(tx.update)(params, state, params)
        assert_came_state_sharding(state, mesh, tx_kwargs)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_eager_init_follows_param_sharding(axis_type):
    mesh = make_mesh((2, 4), axis_type)
    params = place(init_params(), mesh, SPECS)
    assert_came_state_sharding(came_optax.came(1e-2).init(params), mesh, {})


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_jit_init_places_the_momentum_as_optax_adamw_does(axis_type):
    # The README's table of what jit(init) gives without out_shardings, per axis type.
    mesh = make_mesh((2, 4), axis_type)
    with jax.set_mesh(mesh):
        params = place(init_params(), mesh, SPECS)
        came_mu = optax.tree.get(jax.jit(came_optax.came(1e-2).init)(params), "mu")
        adamw_mu = optax.tree.get(jax.jit(optax.adamw(1e-2).init)(params), "mu")
    for name in SHAPES:
        a, b = came_mu[name], adamw_mu[name]
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (name, a.sharding, b.sharding)
        replicated = axis_type == "auto" or SPECS[name] == P()
        assert a.sharding.is_fully_replicated == replicated, (name, a.sharding)


@pytest.mark.parametrize("tx_kwargs", [LAST_TWO, LARGEST_TWO], ids=["last_two", "largest_two"])
def test_state_shardings_equal_what_jit_init_produces_with_explicit_axes(tx_kwargs):
    mesh = make_mesh((2, 4), "explicit")
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(came_optax.came)(learning_rate=1e-2, **tx_kwargs),
    )
    params = place(init_params(), mesh, SPECS)
    predicted = state_shardings(tx, params)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
    assert jax.tree.structure(predicted) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(predicted), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)


def test_state_shardings_replicate_what_the_mesh_cannot_split():
    # (257, 768) over 8 "model" devices: 96 columns each, but an int8 momentum's 256-wide
    # blocks leave 3 columns of scales, which 8 cannot split; they are replicated instead.
    mesh = make_mesh((1, 8), "auto")
    params = place({"w": jnp.ones((257, 768))}, mesh, {"w": P(None, "model")})
    tx = came_optax.came(1e-2, mu_dtype="int8")
    shardings = state_shardings(tx, params)
    scale = jax.eval_shape(tx.init, params)[0].mu_scale["w"]
    assert scale.shape[1] % 8 != 0, scale.shape
    assert shardings[0].mu_scale["w"].spec == P(None, None)
    assert shardings[0].mu["w"].spec == P(None, "model")
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    _, state = jax.jit(tx.update, out_shardings=(None, shardings))(params, state, params)
    assert state[0].mu["w"].sharding.spec == P(None, "model")


@pytest.mark.parametrize("mesh_shape, axis_type", MESH_CASES, ids=mesh_case_id)
def test_sharded_training_matches_unsharded(mesh_shape, axis_type):
    want, _ = unsharded_run()
    mesh, got, opt_state = sharded_run(mesh_shape, axis_type)
    for name in SHAPES:
        assert_sharded_like(got[name], mesh, SPECS[name], name)
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name)
    assert_came_state_sharding(opt_state, mesh, {})


def shard_bytes_per_device(tree):
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def expected_shard_bytes(shape, spec, mesh, itemsize=4):
    entries = list(spec) + [None] * (len(shape) - len(spec))
    parts = 1
    for entry in entries:
        for name in (entry,) if isinstance(entry, str) else entry or ():
            parts *= mesh.shape[name]
    return math.prod(shape) // parts * itemsize


@pytest.mark.parametrize("mesh_shape, axis_type", MESH_CASES, ids=mesh_case_id)
def test_per_device_state_bytes_are_the_params_shard_share(mesh_shape, axis_type):
    mesh, params, state = sharded_run(mesh_shape, axis_type)
    came = state[0]
    param_bytes = shard_bytes_per_device(params)
    mu_bytes = shard_bytes_per_device(came.mu)
    stats_bytes = shard_bytes_per_device((came.v_row, came.v_col, came.v))
    # Every device holds exactly its share: the momentum mirrors the parameters, and
    # a statistic holds its parameter's shard share with the averaged axis removed.
    want_stats = 0
    for (_, row_spec, col_spec, full_spec), name in zip(
        expected_state_specs({}), sorted(SHAPES), strict=True
    ):
        shape = SHAPES[name]
        axes = came_optax.factored_axes(shape)
        placeholder = 4  # a replicated float32 of shape (1,) for each statistic not kept
        if axes is None:
            want_stats += expected_shard_bytes(shape, full_spec, mesh) + 2 * placeholder
        else:
            want_stats += placeholder
            row_shape = shape[: axes[1]] + shape[axes[1] + 1 :]
            col_shape = shape[: axes[0]] + shape[axes[0] + 1 :]
            want_stats += expected_shard_bytes(row_shape, row_spec, mesh)
            want_stats += expected_shard_bytes(col_shape, col_spec, mesh)
    want_params = sum(expected_shard_bytes(SHAPES[n], SPECS[n], mesh) for n in SHAPES)
    assert len(param_bytes) == 8
    for device in mesh.devices.flat:
        assert param_bytes[device] == want_params
        assert mu_bytes[device] == want_params
        assert stats_bytes[device] == want_stats


def as_initializer(value):
    return lambda key, shape, dtype=jnp.float32: value


class NnxModel(nnx.Module):
    """The test model as an NNX module whose kernels carry SPECS (nnx.with_partitioning)."""

    def __init__(self, explicit=False):
        self.explicit = explicit
        for name, value in init_params().items():
            init = nnx.with_partitioning(as_initializer(value), SPECS[name])
            setattr(self, name, nnx.Param(init(None, value.shape)))

    def loss(self, x, y):
        return loss_fn({name: getattr(self, name)[...] for name in SHAPES}, x, y, self.explicit)


def nnx_opt_state_arrays(optimizer):
    return jax.tree.map(
        lambda v: v.get_value(), optimizer.opt_state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_nnx_optimizer_on_partitioned_model(axis_type):
    explicit = axis_type == "explicit"
    mesh = make_mesh((2, 4), axis_type)
    want, _ = unsharded_run()
    x, y = place(batches(), mesh, (P(None, "data"), P(None, "data")))

    @nnx.jit
    def create_in_jit():
        model = NnxModel(explicit)
        return model, nnx.Optimizer(model, training_tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        grads = nnx.grad(lambda m: m.loss(xb, yb))(model)
        optimizer.update(model, grads)

    def assert_state_sharding(optimizer):
        state = nnx_opt_state_arrays(optimizer)
        if explicit:
            assert_came_state_sharding(state, mesh, {})
        else:
            # With auto axes inside nnx.jit, flax places what carries the parameters' boxes
            # (the momentum, as optax.adam's); the small row and column statistics carry no
            # box and are replicated.
            for name, mu in optax.tree.get(state, "mu").items():
                assert_sharded_like(mu, mesh, SPECS[name], f"mu[{name}]")

    with jax.set_mesh(mesh):
        # Eagerly, as the flax guides do, and inside nnx.jit: no workaround either way.
        eager_model = NnxModel(explicit)
        eager_optimizer = nnx.Optimizer(eager_model, training_tx(), wrt=nnx.Param)
        assert_came_state_sharding(nnx_opt_state_arrays(eager_optimizer), mesh, {})
        model, optimizer = create_in_jit()
        assert_state_sharding(optimizer)
        for i in range(STEPS):
            step(model, optimizer, x[i], y[i])
    assert_state_sharding(optimizer)
    for name in SHAPES:
        got = getattr(model, name)[...]
        assert_sharded_like(got, mesh, SPECS[name], name)
        np.testing.assert_allclose(got, want[name], rtol=0, atol=TOLERANCE, err_msg=name)


LOGICAL_NAMES = {
    "w1": ("embed", "mlp"),
    "b1": ("mlp",),
    "w2": ("mlp", "embed"),
    "heads": ("embed", None, "out"),
    "scale": (),
}
LOGICAL_RULES = (("embed", "data"), ("mlp", "model"), ("out", "model"))


class LinenModel(nn.Module):
    """The test model in linen, its parameters annotated with logical axis names."""

    @nn.compact
    def __call__(self, x, y):
        init = init_params()
        params = {
            name: self.param(
                name,
                nn.with_logical_partitioning(as_initializer(value), LOGICAL_NAMES[name]),
                value.shape,
            )
            for name, value in init.items()
        }
        return loss_fn(params, x, y, False)


def test_linen_train_state_with_logical_partitioning():
    mesh = make_mesh((2, 4), "auto")
    want, _ = unsharded_run()
    model, tx = LinenModel(), training_tx()
    x, y = batches()

    def create(key):
        params = nn.meta.unbox(model.init(key, x[0], y[0])["params"])
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    # The flax recipe: logical specs from the abstract parameters, mapped to the mesh;
    # state_shardings derives the optimizer's from the parameters' logical specs.
    abstract_params = jax.eval_shape(model.init, jax.random.key(0), x[0], y[0])["params"]
    logical = nn.get_partition_spec(abstract_params)
    opt_logical = state_shardings(tx, nn.meta.unbox(abstract_params), logical)
    abstract_state = jax.eval_shape(create, jax.random.key(0))
    state_sharding = abstract_state.replace(
        step=NamedSharding(mesh, P()),
        params=nn.logical_to_mesh_sharding(logical, mesh, LOGICAL_RULES),
        opt_state=nn.logical_to_mesh_sharding(opt_logical, mesh, LOGICAL_RULES),
    )
    batch_sharding = NamedSharding(mesh, P("data"))

    def step(state, xb, yb):
        grads = jax.grad(lambda p: state.apply_fn({"params": p}, xb, yb))(state.params)
        return state.apply_gradients(grads=grads)

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=state_sharding)(jax.random.key(0))
        step = jax.jit(
            step,
            in_shardings=(state_sharding, batch_sharding, batch_sharding),
            out_shardings=state_sharding,
            donate_argnums=0,
        )
        x, y = place((x, y), mesh, (P(None, "data"), P(None, "data")))
        for i in range(STEPS):
            state = step(state, x[i], y[i])
    assert_came_state_sharding(state.opt_state, mesh, {})
    for name in SHAPES:
        assert_sharded_like(state.params[name], mesh, SPECS[name], name)
        np.testing.assert_allclose(
            state.params[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name
        )


def test_linen_get_partition_spec_recipe_gives_valid_specs():
    # flax's plain recipe (boxed TrainState -> get_partition_spec -> mesh shardings)
    # must give every leaf a spec no longer than its rank; CAME's row and column
    # statistics carry no boxes, so they come out replicated, never mis-annotated.
    mesh = make_mesh((2, 4), "auto")
    model, tx = LinenModel(), training_tx()
    x, y = batches()

    def create(key):
        params = model.init(key, x[0], y[0])["params"]
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract_state = jax.eval_shape(create, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_state), mesh, LOGICAL_RULES
    )
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_state))
    assert len(jax.tree.leaves(shardings)) == len(leaves)
    for leaf, sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        assert len(sharding.spec) <= leaf.ndim
        sharding.shard_shape(leaf.shape)  # raises for an invalid spec


# --- group_leaves on a mesh ------------------------------------------------------------------

GROUP_SPECS = {"w": [P("data", "model")] * 3, "b": [P("model")] * 3}


def _collectives(compiled):
    text = compiled.as_text()
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {k: text.count(f" {k}(") + text.count(f" {k}-start(") for k in kinds}


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_grouped_state_is_stacked_sharded_and_adds_no_collective(axis_type):
    mesh = make_mesh((2, 4), axis_type)
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        "w": [jax.random.normal(k, (16, 64)) for k in keys[:3]],
        "b": [jax.random.normal(k, (64,)) for k in keys[3:]],
    }
    grads = jax.tree.map(lambda x: jnp.cos(3 * x), params)
    with jax.set_mesh(mesh):
        placed, placed_grads = (place(t, mesh, GROUP_SPECS) for t in (params, grads))
        results, collectives = {}, {}
        for group in (False, True):
            tx = came_optax.came(1e-2, group_leaves=group, debias=True)
            shardings = state_shardings(tx, placed)
            state = jax.jit(tx.init, out_shardings=shardings)(placed)
            update = jax.jit(tx.update, out_shardings=(None, shardings))
            collectives[group] = _collectives(update.lower(placed_grads, state, placed).compile())
            results[group], state = update(placed_grads, state, placed)
        came = state[0]
    # Each group's stack keeps its members' placement, behind the new leading axis.
    assert came.mu.stacks[1].sharding.spec == P(None, "data", "model")
    assert came.v_row.stacks[1].sharding.spec == P(None, "data")
    assert came.v_col.stacks[1].sharding.spec == P(None, "model")
    # One reduction per group instead of one per leaf: fewer all-reduces, of stacked means.
    assert all(collectives[True][k] <= collectives[False][k] for k in collectives[True])
    for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_grouping_differently_sharded_leaves_is_refused_with_explicit_axes():
    mesh = make_mesh((2, 4), "explicit")
    specs = {"a": P("data", "model"), "b": P("model", "data")}
    params = {"a": jnp.ones((16, 16)), "b": jnp.ones((16, 16))}
    with jax.set_mesh(mesh):
        placed = place(params, mesh, specs)
        with pytest.raises(ValueError, match=r"would stack \['a'\] .* with \['b'\]"):
            came_optax.came(1e-2, group_leaves=True).init(placed)
