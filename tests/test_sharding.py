"""state_shardings derives the optimizer state's shardings from the parameters'.

The checks here need one device: PartitionSpecs are propagated abstractly. The
checks on 8 simulated devices (placement by ``jax.jit(tx.init)`` and the update,
sharded training equal to unsharded training, per-device bytes, ``nnx.Optimizer``
and linen ``TrainState``) live in ``tests/_multidevice_sharding.py``, which
:func:`test_eight_device_checks_in_a_subprocess` runs with
``--xla_force_host_platform_device_count=8`` so that this process keeps one device.
"""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, reduced_spec, run_python
from hypothesis import strategies as st
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import came_optax
from came_optax import state_shardings

PARAMS = {
    "w": jnp.zeros((8, 4)),
    "conv": jnp.zeros((3, 3, 8, 16)),
    "b": jnp.zeros(4),
    "scale": jnp.zeros(()),
}
SPECS = {
    "w": P("data", "model"),
    "conv": P(None, None, "data", "model"),
    "b": P("model"),
    "scale": P(),
}


def same_spec(a, b, ndim):
    """Equal as partition specs of a rank-``ndim`` array (trailing Nones are implied)."""
    return tuple(a) + (None,) * (ndim - len(a)) == tuple(b) + (None,) * (ndim - len(b))


def assert_came_specs(state, params, specs, factoring=None):
    """``state``: the specs of a ScaleByCameState for ``params`` sharded by ``specs``."""
    factoring = factoring or {}
    leaves = jax.tree.leaves(params)
    leaf_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    fields = {
        f: jax.tree.leaves(getattr(state, f), is_leaf=lambda x: isinstance(x, P))
        for f in ("mu", "v_row", "v_col", "v", "r_row", "r_col")
    }
    assert state.count == P()
    for i, (leaf, spec) in enumerate(zip(leaves, leaf_specs, strict=True)):
        ndim = leaf.ndim
        assert same_spec(fields["mu"][i], spec, ndim)
        axes = came_optax.factored_axes(leaf.shape, **factoring)
        if axes is None:
            for f in ("v_row", "v_col", "r_row", "r_col"):
                assert same_spec(fields[f][i], P(), 1), (f, i)  # a replicated placeholder
            assert same_spec(fields["v"][i], spec, ndim)
            continue
        row_axis, col_axis = axes
        assert same_spec(fields["v"][i], P(), 1)
        for stat in (fields["v_row"][i], fields["r_row"][i]):
            assert same_spec(stat, reduced_spec(spec, ndim, col_axis), ndim - 1), (i, stat)
        for stat in (fields["v_col"][i], fields["r_col"][i]):
            assert same_spec(stat, reduced_spec(spec, ndim, row_axis), ndim - 1), (i, stat)


@pytest.mark.parametrize(
    "factoring",
    [{}, {"factored_dims": "largest_two"}, {"min_dim_size_to_factor": 8}],
    ids=["last_two", "largest_two", "min_dim_8"],
)
def test_came_state_specs_drop_the_averaged_axis(factoring):
    tx = came_optax.came(1e-3, **factoring)
    specs = state_shardings(tx, PARAMS, SPECS)
    assert jax.tree.structure(specs) == jax.tree.structure(jax.eval_shape(tx.init, PARAMS))
    assert_came_specs(specs[0], PARAMS, SPECS, factoring)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    shape=st.lists(st.sampled_from([1, 2, 4]), min_size=2, max_size=4),
    names=st.lists(st.sampled_from([None, "a", "b", "c", ("a", "b")]), min_size=4, max_size=4),
    factored_dims=st.sampled_from(["last_two", "largest_two"]),
)
def test_any_shape_and_spec(shape, names, factored_dims):
    # Equal sizes make several axes candidates for the averaged one; the spec must
    # still lose exactly the axis that factored_axes picks.
    entries, used = [], set()
    for entry in names[: len(shape)]:
        axes = set(entry) if isinstance(entry, tuple) else {entry} - {None}
        entries.append(None if axes & used else entry)
        used |= axes
    params, specs = {"x": jnp.zeros(shape)}, {"x": P(*entries)}
    factoring = {"factored_dims": factored_dims}
    state = state_shardings(came_optax.came(1e-3, **factoring), params, specs)
    assert_came_specs(state[0], params, specs, factoring)


def test_logical_axis_names_pass_through():
    params = {"kernel": jnp.zeros((6, 10))}
    specs = {"kernel": P("embed", ("heads", "kv"))}
    state = state_shardings(came_optax.came(1e-3), params, specs)
    assert state[0].v_row == {"kernel": P("embed")}
    assert state[0].v_col == {"kernel": P(("heads", "kv"))}
    assert state[0].mu["kernel"] == P("embed", ("heads", "kv"))


def _is_came_state(x):
    return isinstance(x, came_optax.ScaleByCameState)


def _is_spec(x):
    return isinstance(x, P)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(optax.clip_by_global_norm(1.0), came_optax.came(1e-3)),
        lambda: optax.inject_hyperparams(came_optax.came)(learning_rate=1e-3),
        lambda: optax.MultiSteps(came_optax.came(1e-3), every_k_schedule=2),
        lambda: came_optax.came(1e-3, weight_decay=0.1, mask=lambda p: {k: True for k in p}),
    ],
    ids=["chain", "inject_hyperparams", "multi_steps", "masked_decay"],
)
def test_chains_with_came_inside(make_tx):
    tx = make_tx()
    specs = state_shardings(tx, PARAMS, SPECS)
    assert jax.tree.structure(specs) == jax.tree.structure(jax.eval_shape(tx.init, PARAMS))
    came_states = [x for x in jax.tree.leaves(specs, is_leaf=_is_came_state) if _is_came_state(x)]
    assert len(came_states) == 1
    assert_came_specs(came_states[0], PARAMS, SPECS)
    # Outside CAME's states: counts and hyperparameters are replicated, and
    # parameter-shaped trees (MultiSteps' accumulated gradients) follow the parameters.
    rest = jax.tree.leaves(
        jax.tree.map(lambda x: None if _is_came_state(x) else x, specs, is_leaf=_is_came_state),
        is_leaf=_is_spec,
    )
    assert rest == [] or P() in rest
    assert all(leaf == P() or leaf in SPECS.values() for leaf in rest), rest


def test_multi_transform_with_adam_for_some_leaves():
    labels = {"w": "came", "conv": "came", "b": "adam", "scale": "adam"}
    tx = optax.multi_transform({"came": came_optax.came(1e-3), "adam": optax.adam(1e-3)}, labels)
    specs = state_shardings(tx, PARAMS, SPECS)
    adam = specs.inner_states["adam"].inner_state[0]
    assert adam.count == P()
    assert adam.mu["b"] == adam.nu["b"] == P("model")
    assert isinstance(adam.mu["w"], optax.MaskedNode)
    came = specs.inner_states["came"].inner_state[0]
    # The masked CAME state holds the statistics of 'conv' and 'w' only.
    assert came.v_row["conv"] == reduced_spec(SPECS["conv"], 4, 3) and came.v_row["w"] == P("data")
    assert came.v_col["conv"] == reduced_spec(SPECS["conv"], 4, 2) and came.v_col["w"] == P("model")
    assert came.mu["w"] == SPECS["w"]
    assert isinstance(came.mu["b"], optax.MaskedNode)
    assert isinstance(came.v_row["b"], optax.MaskedNode)


def test_other_optax_states_follow_their_params():
    specs = state_shardings(optax.adafactor(1e-3), PARAMS, SPECS)
    assert specs[0].v["b"] == P("model") and specs[0].count == P()
    specs = state_shardings(optax.adamw(1e-3), PARAMS, SPECS)
    assert specs[0].mu == specs[0].nu == SPECS


def test_named_shardings_in_named_shardings_out():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), PARAMS, SPECS)
    tx = came_optax.came(1e-3)
    shardings = state_shardings(tx, params)  # read from the arrays
    for leaf in jax.tree.leaves(shardings):
        assert isinstance(leaf, NamedSharding) and leaf.mesh == mesh
    specs = jax.tree.map(lambda s: s.spec, shardings)
    assert_came_specs(specs[0], PARAMS, SPECS)
    assert shardings[0].count == NamedSharding(mesh, P())
    # The same from ShapeDtypeStructs, and usable as out_shardings of jit(init).
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    assert state_shardings(tx, abstract) == shardings
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert state[0].mu["w"].sharding == shardings[0].mu["w"]


def test_single_device_arrays_give_their_sharding():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    shardings = state_shardings(came_optax.came(1e-3), params)
    device = jax.devices()[0]
    for leaf in jax.tree.leaves(shardings):
        assert leaf == SingleDeviceSharding(device)


def test_jit_init_keeps_the_reference_values():
    # Deriving zero statistics from the parameter (so that they shard like it) still
    # gives exact zeros of the documented shapes and dtypes.
    params = {"w": jnp.full((5, 3), jnp.inf, jnp.bfloat16), "v": jnp.full(3, jnp.nan)}
    tx = came_optax.came(1e-3)
    for state in (tx.init(params), jax.jit(tx.init)(params)):
        came = state[0]
        assert came.v_row["w"].shape == (5,) and came.v_col["w"].shape == (3,)
        assert came.v_row["w"].dtype == jnp.float32
        for leaf in jax.tree.leaves(state):
            assert not np.any(np.asarray(leaf, np.float32)), leaf


@pytest.mark.parametrize(
    "params, shardings, message",
    [
        (PARAMS, {"w": P("data")}, "one Sharding, PartitionSpec or None per parameter"),
        ({"w": jnp.zeros(4)}, {"w": P("data", "model")}, "has rank 1 but its partition spec"),
        ({"w": jnp.zeros(4)}, {"w": P(P.UNCONSTRAINED)}, "UNCONSTRAINED"),
        ({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, None, "has no sharding"),
        ({"w": jnp.zeros(4)}, {"w": 3}, "one Sharding, PartitionSpec or None per parameter"),
    ],
    ids=["too_few", "spec_too_long", "unconstrained", "no_sharding", "not_a_sharding"],
)
def test_bad_input_is_a_clear_error(params, shardings, message):
    with pytest.raises(ValueError, match=message):
        state_shardings(came_optax.came(1e-3), params, shardings)


def test_two_meshes_and_non_transformations_are_errors():
    mesh_a = jax.make_mesh((1,), ("a",))
    mesh_b = jax.make_mesh((1,), ("b",))
    params = {"x": jnp.zeros(4), "y": jnp.zeros(4)}
    shardings = {"x": NamedSharding(mesh_a, P("a")), "y": NamedSharding(mesh_b, P("b"))}
    with pytest.raises(ValueError, match="different meshes"):
        state_shardings(came_optax.came(1e-3), params, shardings)
    with pytest.raises(ValueError, match="GradientTransformation or an init function"):
        state_shardings(0.1, params, {"x": P(), "y": P()})


@pytest.mark.multidevice
@pytest.mark.slow
def test_eight_device_checks_in_a_subprocess():
    module = REPO / "tests" / "_multidevice_sharding.py"
    result = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
        devices=8,
        # Faster CPU compiles; both sides of every comparison use the same flags.
        xla_flags=["--xla_backend_optimization_level=0"],
        timeout=540,
    )
    assert result.returncode == 0, f"8-device checks failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout
