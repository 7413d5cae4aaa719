"""Many layers: ``batch_dims`` (stacked layers updated per copy) and ``group_leaves``.

A stacked ``(layers, ...)`` leaf with ``batch_dims=1`` must be updated exactly as its layers
would be as separate leaves, and ``group_leaves=True`` exactly as per-leaf CAME, each to float32
rounding (<= 1e-5 of the parameters' movement), on every option. The layers get gradient scales
from 1e-3 to 100, so any statistic taken over all layers at once (the clip's RMS, the cautious
kept fraction, a factored mean) shows. Then the grouped state's layout: checkpoints, conversion
between the layouts, ``check_state``, ``convert_momentum``, ``optax.tree.map_params`` and
``nnx.Optimizer``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_bitwise_equal, assert_close_to_movement, deviations_from_movement

import came_optax

LAYERS = 4
# Per layer: a kernel, a vector and a conv-like rank-3 leaf; int8-sized ones for mu_dtype="int8".
LAYER = {"kernel": (16, 24), "bias": (24,), "heads": (2, 8, 12)}
LAYER_INT8 = {"kernel": (64, 128), "bias": (8192,), "heads": (2, 16, 128)}
SCALES = np.logspace(-3, 2, LAYERS)

CASES = {
    "reference": {},
    "debias_cautious": dict(debias=True, cautious=True, weight_decay=0.1),
    "int8_mu": dict(mu_dtype="int8", debias=True),
    "bf16_mu": dict(mu_dtype="bfloat16"),
    "no_clip": dict(clip_threshold=None),
    "largest_two": dict(factored_dims="largest_two"),
    "min_dim": dict(min_dim_size_to_factor=12),
}


def _layer_shapes(case):
    return LAYER_INT8 if GROUP_CASES[case].get("mu_dtype") == "int8" else LAYER


def _stacked_params(shapes):
    """An unstacked embedding and ``LAYERS`` stacked copies of each layer leaf."""
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    params = {"embed": jax.random.normal(keys[0], (40, 16))}
    for key, (name, shape) in zip(keys[1:], shapes.items(), strict=True):
        params[name] = jax.random.normal(key, (LAYERS, *shape))
    return params


def _separate(tree):
    """The stacked leaves of ``tree`` as a list of per-layer leaves."""
    return {k: v if k == "embed" else [v[i] for i in range(LAYERS)] for k, v in tree.items()}


def _stacked(tree):
    return {k: v if k == "embed" else jnp.stack(v) for k, v in tree.items()}


BATCH_DIMS = lambda params: {k: 0 if k == "embed" else 1 for k in params}  # noqa: E731


def _grads(t, stacked_params):
    """Gradients whose layers differ in scale by five orders of magnitude."""
    keys = jax.random.split(jax.random.key(100 + t), len(stacked_params))
    out = {}
    for key, (name, p) in zip(keys, stacked_params.items(), strict=True):
        g = jax.random.normal(key, p.shape)
        if name != "embed":
            g = g * SCALES.reshape((LAYERS,) + (1,) * (p.ndim - 1))
        out[name] = g
    return out


def _train(tx, params, layout, steps=5):
    """``steps`` updates; ``layout`` turns stacked gradients into the parameters' layout."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    stacked_shapes = _stacked(params) if layout is _separate else params
    for t in range(steps):
        updates, state = update(layout(_grads(t, stacked_shapes)), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _same(tree):
    return tree


@pytest.mark.parametrize("case", list(CASES))
def test_a_stacked_leaf_with_batch_dims_equals_its_layers_as_separate_leaves(case):
    stacked = _stacked_params(_layer_shapes(case))
    tx_stacked = came_optax.came(1e-2, batch_dims=BATCH_DIMS, **CASES[case])
    p_stacked, _ = _train(tx_stacked, stacked, _same)
    p_separate, _ = _train(came_optax.came(1e-2, **CASES[case]), _separate(stacked), _separate)
    assert_close_to_movement(p_stacked, _stacked(p_separate), stacked, tol=1e-5)


@pytest.mark.parametrize("case", ["reference", "debias_cautious"])
def test_without_batch_dims_a_stacked_leaf_is_one_tensor_and_drifts(case):
    # The contrast that makes the test above meaningful: all layers at once is another optimizer.
    stacked = _stacked_params(LAYER)
    p_stacked, _ = _train(came_optax.came(1e-2, **CASES[case]), stacked, _same)
    p_separate, _ = _train(came_optax.came(1e-2, **CASES[case]), _separate(stacked), _separate)
    deviations = deviations_from_movement(p_stacked, _stacked(p_separate), stacked)
    assert max(deviations.values()) > 1e-3, deviations


def test_batch_dims_as_an_int_a_tree_or_a_callable_agree():
    stacked = {k: v for k, v in _stacked_params(LAYER).items() if k != "embed"}
    runs = [
        _train(came_optax.came(1e-2, batch_dims=b), stacked, _same)[0]
        for b in (1, {k: 1 for k in stacked}, lambda p: jax.tree.map(lambda _: 1, p))
    ]
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])


def test_stage_transforms_with_batch_dims_equal_came_with_batch_dims():
    stacked = _stacked_params(LAYER)
    chain = optax.chain(
        came_optax.scale_by_factored_second_moment(batch_dims=BATCH_DIMS),
        came_optax.scale_by_confidence(batch_dims=BATCH_DIMS),
        optax.scale(-1e-2),
    )
    tx = optax.chain(
        came_optax.scale_by_came(clip_threshold=None, batch_dims=BATCH_DIMS), optax.scale(-1e-2)
    )
    assert_close_to_movement(
        _train(chain, stacked, _same)[0], _train(tx, stacked, _same)[0], stacked, tol=1e-5
    )


def test_cautious_factor_per_copy_equals_each_copy_alone():
    from came_optax._cautious import cautious_factor

    u, g = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))
    g = g.at[0, 0].set(jnp.abs(u[0, 0]) * jnp.sign(u[0, 0]))  # one copy keeps everything
    per_copy = cautious_factor(u, g, 1e-3, batch_dims=2)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(per_copy[i, j], cautious_factor(u[i, j], g[i, j], 1e-3))


@pytest.mark.parametrize(
    "batch_dims, message",
    [
        ({"embed": 0, "kernel": 4, "bias": 1, "heads": 1}, "only 3 axes"),
        (1.0, "Python ints"),
        ({"kernel": 1}, "parameters' structure"),
    ],
)
def test_bad_batch_dims_name_what_is_wrong(batch_dims, message):
    params = _stacked_params(LAYER)
    with pytest.raises(ValueError, match=message):
        came_optax.came(1e-2, batch_dims=batch_dims).init(params)


def test_batch_dims_under_inject_hyperparams_must_be_static():
    params = _stacked_params(LAYER)
    injected = optax.inject_hyperparams(came_optax.came)
    with pytest.raises(ValueError, match="static_args=\\('batch_dims',\\)"):
        injected(1e-2, batch_dims=1).init(params)
    tx = optax.inject_hyperparams(came_optax.came, static_args=("batch_dims",))
    p_stacked, _ = _train(tx(1e-2, batch_dims=BATCH_DIMS), params, _same)
    p_separate, _ = _train(tx(1e-2), _separate(params), _separate)
    assert_close_to_movement(p_stacked, _stacked(p_separate), params, tol=1e-5)


# --- group_leaves ------------------------------------------------------------------------------

GROUP_CASES = CASES | {
    "stochastic_rounding_bf16": dict(stochastic_rounding=True, seed=3, weight_decay=0.1),
    "mask_hyperparams": dict(
        b1=0.8,
        b2=0.95,
        b3=0.99,
        eps1=1e-20,
        eps2=1e-12,
        clip_threshold=0.5,
        weight_decay=0.1,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    ),
    "batch_dims": dict(batch_dims=BATCH_DIMS, cautious=True),
}


def _unscanned(case):
    """The stacked model as separate leaves, or stacked where the case scans it."""
    params = _stacked_params(_layer_shapes(case))
    if "batch_dims" in GROUP_CASES[case]:
        return params, _same
    if "stochastic_rounding" in case:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return _separate(params), _separate


def _per_leaf_fields(state):
    """The statistics of a CAME state (grouped or not) as per-leaf trees."""
    fields = state[0]._asdict()
    return {k: v.ungrouped() if isinstance(v, came_optax.Grouped) else v for k, v in fields.items()}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_grouped_leaves_equal_per_leaf_came(case):
    params, layout = _unscanned(case)
    options = GROUP_CASES[case]
    p_group, s_group = _train(came_optax.came(1e-2, group_leaves=True, **options), params, layout)
    p_leaf, s_leaf = _train(came_optax.came(1e-2, **options), params, layout)
    if "stochastic_rounding" in case:
        # Updates equal to float32 rounding may round stochastically to neighbouring values.
        for a, b in zip(jax.tree.leaves(p_group), jax.tree.leaves(p_leaf), strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6)
    else:
        assert_close_to_movement(p_group, p_leaf, params, tol=1e-5)
    grouped, per_leaf = _per_leaf_fields(s_group), _per_leaf_fields(s_leaf)
    for field, tree in per_leaf.items():
        assert jax.tree.structure(grouped[field]) == jax.tree.structure(tree), field
        for a, b in zip(jax.tree.leaves(grouped[field]), jax.tree.leaves(tree), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), field
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            rtol = 2**-7 if field == "mu" and "mu_dtype" in options else 2e-5
            np.testing.assert_allclose(
                a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)), err_msg=field
            )


def test_the_grouped_state_holds_one_stack_per_shape():
    params = _separate(_stacked_params(LAYER))
    state = came_optax.came(1e-2, group_leaves=True).init(params)[0]
    # In jax.tree.leaves order: the layers' biases, embed, the layers' heads and kernels.
    assert isinstance(state.mu, came_optax.Grouped)
    assert [s.shape for s in state.mu.stacks] == [
        (LAYERS, 24),
        (1, 40, 16),
        (LAYERS, 2, 8, 12),
        (LAYERS, 16, 24),
    ]
    assert [s.shape for s in state.v_row.stacks] == [(LAYERS, 1), (1, 40), (4, 2, 8), (4, 16)]
    assert state.v.stacks[0].shape == (LAYERS, 24)


def test_a_grouped_update_has_a_few_kernels_per_group_not_per_leaf():
    # 4 groups instead of 13 leaves: the compiled program's fusions do not grow with the layers.
    def fusions(layers):
        params = {f"w{i}": jnp.ones((16, 24)) for i in range(layers)}
        tx = came_optax.came(1e-2, group_leaves=True)
        update = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
        return update.as_text().count(" fusion(")

    assert fusions(24) <= fusions(2) + 2 * 24  # the per-leaf slices at most: 2 per leaf


def test_grouping_follows_batch_dims_and_dtype():
    params = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 8)), "c": jnp.ones((4, 8), jnp.bfloat16)}
    tx = came_optax.came(1e-2, group_leaves=True, batch_dims={"a": 0, "b": 1, "c": 0})
    assert tx.init(params)[0].mu.members == ((0,), (1,), (2,))
    assert came_optax.came(1e-2, group_leaves=True).init(params)[0].mu.members == ((0, 1), (2,))


def test_an_update_that_does_not_fit_the_groups_is_refused():
    params = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 8))}
    tx = came_optax.came(1e-2, group_leaves=True)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(8, 4\)"):
        tx.update({"a": jnp.ones((4, 8)), "b": jnp.ones((8, 4))}, state, params)
    with pytest.raises(ValueError, match="updates have 3 leaves"):
        tx.update(params | {"c": jnp.ones(3)}, state, params | {"c": jnp.ones(3)})


# --- The grouped state's layout ----------------------------------------------------------------

CONVERT_OPTIONS = dict(debias=True, mu_dtype="int8")


def test_a_state_converts_between_the_layouts_exactly_and_the_run_continues():
    params = _separate(_stacked_params(LAYER_INT8))
    per_leaf = came_optax.came(1e-2, **CONVERT_OPTIONS)
    grouped = came_optax.came(1e-2, group_leaves=True, **CONVERT_OPTIONS)
    p, state = _train(per_leaf, params, _separate, steps=2)

    as_grouped = came_optax.upgrade_state(state, grouped, p)
    came_optax.check_state(as_grouped, grouped, p)
    assert_bitwise_equal(came_optax.upgrade_state(as_grouped, per_leaf, p), state)

    update = jax.jit(grouped.update)
    g = _separate(_grads(7, _stacked(p)))
    p_grouped = optax.apply_updates(p, update(g, as_grouped, p)[0])
    p_leaf = optax.apply_updates(p, jax.jit(per_leaf.update)(g, state, p)[0])
    assert_close_to_movement(p_grouped, p_leaf, p, tol=1e-5)


def test_check_state_refuses_the_other_layout_and_says_how_to_convert():
    params = {"w": jnp.ones((4, 8)), "v": jnp.ones((4, 8))}
    grouped = came_optax.came(1e-2, group_leaves=True)
    per_leaf_state = came_optax.came(1e-2).init(params)
    with pytest.raises(ValueError, match=r"state\[0\].mu is kept per-leaf .*upgrade_state"):
        came_optax.check_state(per_leaf_state, grouped, params)
    with pytest.raises(ValueError, match="kept grouped in the checkpoint but per-leaf"):
        came_optax.check_state(grouped.init(params), came_optax.came(1e-2), params)


def test_a_grouped_state_survives_a_checkpoint_with_and_without_its_types(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _separate(_stacked_params(LAYER))
    tx = came_optax.came(1e-2, group_leaves=True, debias=True)
    _, state = _train(tx, params, _separate, steps=2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    with ocp.StandardCheckpointer() as checkpointer:
        typed = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
        raw = checkpointer.restore(tmp_path / "state")
    assert_bitwise_equal(typed, state)
    assert_bitwise_equal(came_optax.upgrade_state(raw, tx, params), state)
    with pytest.raises(ValueError, match="restored without their types"):
        came_optax.upgrade_state(raw, came_optax.came(1e-2, debias=True), params)


def test_convert_momentum_keeps_a_grouped_state_grouped():
    params = _separate(_stacked_params(LAYER_INT8))
    tx = came_optax.came(1e-2, group_leaves=True)
    _, state = _train(tx, params, _separate, steps=2)
    int8 = came_optax.convert_momentum(state, "int8")
    came_optax.check_state(int8, came_optax.came(1e-2, group_leaves=True, mu_dtype="int8"), params)
    # Per leaf then grouped is the same conversion.
    per_leaf = came_optax.upgrade_state(state, came_optax.came(1e-2), params)
    expected = came_optax.convert_momentum(per_leaf, "int8")
    grouped_tx = came_optax.came(1e-2, group_leaves=True, mu_dtype="int8")
    assert_bitwise_equal(int8, came_optax.upgrade_state(expected, grouped_tx, params))


def test_map_params_maps_the_stacks_of_a_grouped_state():
    params = _separate(_stacked_params(LAYER))
    tx = came_optax.came(1e-2, group_leaves=True)
    _, state = _train(tx, params, _separate, steps=2)
    reset = optax.tree.map_params(tx, jnp.zeros_like, state)
    assert int(reset[0].count) == 2
    assert all(not jnp.any(x) for x in jax.tree.leaves(reset[0].mu))
    assert_bitwise_equal(reset[0]._replace(count=jnp.zeros([], jnp.int32)), tx.init(params)[0])


def test_nnx_optimizer_with_a_scanned_model_and_grouped_leaves():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(8, 8, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs):
        return Block(rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(3, 8, rngs=rngs)
            self.blocks = create_blocks(rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

    def in_blocks(state):
        return jax.tree.map_with_path(
            lambda path, _: int("blocks" in jax.tree_util.keystr(path)), state
        )

    model = Model(nnx.Rngs(0))
    tx = came_optax.came(1e-2, batch_dims=in_blocks, group_leaves=True, cautious=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    start = jax.tree.map(np.asarray, params)
    grads = jax.tree.map(jnp.ones_like, params)
    reference = came_optax.came(1e-2, batch_dims=in_blocks, cautious=True)
    updates, _ = reference.update(grads, reference.init(params), params)
    expected = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
    optimizer.update(model, grads)
    assert isinstance(optimizer.opt_state[0].mu, came_optax.Grouped)
    assert_close_to_movement(nnx.state(model, nnx.Param), expected, start, tol=1e-6)


def test_batch_dims_as_a_tree_of_nnx_variables_fits_unboxed_updates():
    nnx = pytest.importorskip("flax.nnx")
    params = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
    ones = jax.tree.map(lambda _: 1, params)  # Params holding 1, as a user writes it
    as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # flax renamed it in 0.12.x
    plain = as_pure(params)  # the plain arrays nnx.Optimizer hands the optimizer
    tx = came_optax.came(1e-2, batch_dims=ones)
    state = tx.init(plain)
    assert state[0].v["kernel"].shape == (4, 3)  # each row of the kernel is a copy
