"""Per-leaf state, and the one loop that runs a stage's per-leaf math over a tree.

Every statistic CAME keeps is a tree with the parameters' structure, so that
``optax.tree.map_params`` and ``optax.tree.get`` work on the state as they do
on ``optax.adam``'s. Two kinds of tree are built:

* the parameters' own structure (``jax.tree.map`` over them), metadata boxes included. A
  momentum has its parameter's shape, so Flax's ``nnx.Variable`` or linen's
  ``nn.Partitioned`` annotations (its sharding) apply to it unchanged.
* :func:`unboxed`: the same containers with each metadata box replaced by its
  array. Row and column statistics have fewer axes than their parameter, so a
  copy of the parameter's sharding annotation would be wrong for them.

A leaf that a statistic does not apply to (a row statistic of a vector, say)
holds a one-element placeholder, as ``optax.adafactor`` does.

:func:`update_leaves` is the driver of every CAME transformation: it checks the
updates against the state, calls the stage's per-leaf function on each leaf and
rebuilds the trees.

With ``group_leaves=True`` each statistic is instead a :class:`Grouped`: leaves of one
shape, dtype and number of batch axes (:func:`group_members`) stacked along a new leading
axis. The driver then calls the per-leaf function once per group, on the stacked
gradients, with that axis as one more batch axis; ``batch_dims`` makes every per-leaf
quantity per copy, so a group's update is its leaves' updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from came_optax import _checks, _quantize

# What a state field holds per leaf, for the shape check: the parameter's shape, a row or
# column statistic (a placeholder where the leaf is not factored), a full statistic (a
# placeholder where it is), or something else (None: not checked).
FieldKind = Literal["param", "row", "col", "full"] | None


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype updates are computed in: float32 or complex64, or their 64-bit forms."""
    return jnp.promote_types(dtype, jnp.float32)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype statistics are kept in (float32, or float64 for 64-bit leaves)."""
    return jnp.finfo(compute_dtype(dtype)).dtype


def is_box(x: Any) -> bool:
    """True for a metadata box around one array: ``nnx.Variable``, ``nn.Partitioned``."""
    return (hasattr(x, "get_metadata") and hasattr(x, "get_value")) or (
        hasattr(x, "unbox") and hasattr(x, "replace_boxed")
    )


def _unbox(x: Any) -> Any:
    if not is_box(x):
        return x
    leaves = jax.tree.leaves(x)
    if len(leaves) != 1:
        raise ValueError(
            f"CAME expects each parameter box ({type(x).__name__}) to hold one array; "
            f"this one holds {len(leaves)}."
        )
    return leaves[0]


def unboxed(fn: Callable[[Any], Any], params: Any) -> Any:
    """``fn`` of each parameter array, in the parameters' structure without boxes."""
    return jax.tree.map(lambda x: fn(_unbox(x)), params, is_leaf=is_box)


def unzip_tree(fn: Callable[..., tuple[Any, ...]], params: Any, n: int, *args: list) -> tuple:
    """``n`` trees (without boxes) from ``fn`` of each parameter array, which returns n values.

    Each of ``args`` holds one more argument of ``fn`` per leaf.
    """
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_box)
    results = [fn(_unbox(x), *a) for x, *a in zip(leaves, *args, strict=True)]
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(n))


def placeholder(dtype: Any = jnp.float32) -> jax.Array:
    """The one-element stand-in for a statistic a leaf does not keep."""
    return jnp.zeros((1,), dtype)


def like(tree: Any, leaves: list[Any]) -> Any:
    """``leaves`` in the structure of ``tree``."""
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _expected_shape(kind: FieldKind, shape: tuple[int, ...], axes: Any) -> tuple[int, ...] | None:
    if kind == "param":
        return shape
    if kind == "full":
        return shape if axes is None else (1,)
    if kind in ("row", "col"):
        if axes is None:
            return (1,)
        dropped = axes[1] if kind == "row" else axes[0]
        return shape[:dropped] + shape[dropped + 1 :]
    return None


def per_leaf(value: Any, tree: Any, name: str, who: str) -> list[Any]:
    """``value`` for each leaf of ``tree``, in ``jax.tree.leaves`` order.

    ``value`` is one value for every leaf, a tree with ``tree``'s structure (its metadata boxes
    may be left out), or a callable of ``tree`` returning either, as ``optax.masked``'s mask.
    """
    if callable(value):
        value = value(tree)
    count = len(jax.tree.leaves(tree))
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) and value is not None:
        return [value] * count
    for treedef in (jax.tree.structure(tree), jax.tree.structure(tree, is_leaf=is_box)):
        try:
            # A value may sit in a metadata box where the tree has none (nnx.Optimizer unboxes).
            return [_unbox(v) for v in treedef.flatten_up_to(value)]
        except (ValueError, TypeError):
            continue
    raise ValueError(
        f"{who}: {name} must be one value, a tree with the parameters' structure or a callable "
        f"of the parameters returning one; got a tree of structure {jax.tree.structure(value)} "
        f"for parameters of structure {jax.tree.structure(tree, is_leaf=is_box)}."
    )


def batch_dims_of(batch_dims: Any, tree: Any, who: str) -> list[int]:
    """Each leaf's number of leading batch axes (see :func:`per_leaf`; None is 0), validated."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    dims = per_leaf(0 if batch_dims is None else batch_dims, tree, "batch_dims", who)
    for (path, leaf), b in zip(flat, dims, strict=True):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0:
            raise ValueError(
                f"{who}: batch_dims must be Python ints >= 0 decided at trace time; got {b!r} for "
                f"{_checks.leaf_name(path)}. Under optax.inject_hyperparams, pass "
                "static_args=('batch_dims',)."
            )
        if b > len(jnp.shape(leaf)):
            raise ValueError(
                f"{who}: batch_dims={b} for {_checks.leaf_name(path)}, which has only "
                f"{len(jnp.shape(leaf))} axes (shape {jnp.shape(leaf)}). Give such leaves "
                "batch_dims 0 with a tree or a callable of the parameters."
            )
    return [int(b) for b in dims]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Grouped:
    """A statistic kept per group of same-shaped leaves (``group_leaves=True``).

    Attributes:
      stacks: one array per group: its leaves' statistics stacked along a new leading axis.
      members: per group, the indices of its leaves in ``jax.tree.leaves`` order (static).
      treedef: the per-leaf tree's structure (static), which :meth:`ungrouped` rebuilds.

    Example:
      >>> import jax.numpy as jnp, came_optax
      >>> params = {'a': jnp.ones((3, 2)), 'b': jnp.ones(2), 'c': jnp.ones((3, 2))}
      >>> mu = came_optax.came(1e-3, group_leaves=True).init(params)[0].mu
      >>> mu.members, [s.shape for s in mu.stacks], mu.ungrouped()['c'].shape
      (((0, 2), (1,)), [(2, 3, 2), (1, 2)], (3, 2))
    """

    stacks: tuple[Any, ...]
    members: tuple[tuple[int, ...], ...] = dataclasses.field(metadata={"static": True})
    treedef: Any = dataclasses.field(metadata={"static": True})

    def ungrouped(self) -> Any:
        """The per-leaf tree: each group's stack split back into its leaves."""
        leaves: list[Any] = [None] * self.treedef.num_leaves
        for stack, members in zip(self.stacks, self.members, strict=True):
            for j, i in enumerate(members):
                leaves[i] = _row(stack, j)
        return self.treedef.unflatten(leaves)


def _row(stack: Any, j: int) -> Any:
    if isinstance(stack, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(stack.shape[1:], stack.dtype)
    return stack[j]


def group(tree: Any, members: tuple[tuple[int, ...], ...]) -> Grouped:
    """``tree``'s leaves stacked per group of ``members``."""
    leaves = jax.tree.leaves(tree)
    stacks = tuple(jnp.stack([leaves[i] for i in m]) for m in members)
    return Grouped(stacks, members, jax.tree.structure(tree))


def group_members(params: Any, dims: list[int], who: str) -> tuple[tuple[int, ...], ...]:
    """Indices of the leaves of ``params`` grouped by shape, dtype and batch axes.

    Groups come in the order of their first leaf. Leaves of one group must be placed alike
    where their type says how (explicit mesh axes): stacking differently sharded leaves
    would move them between devices.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    groups: dict[Any, list[int]] = {}
    for i, ((_, leaf), b) in enumerate(zip(flat, dims, strict=True)):
        key = (tuple(jnp.shape(leaf)), jnp.dtype(jnp.result_type(leaf)), b)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        first = _quantize.explicit_spec(flat[members[0]][1])
        for i in members[1:]:
            spec = _quantize.explicit_spec(flat[i][1])
            if spec != first:
                name = _checks.leaf_name(flat[members[0]][0])
                raise ValueError(
                    f"{who}: group_leaves=True would stack {name} (sharded {_spec(first)}) "
                    f"with {_checks.leaf_name(flat[i][0])} (sharded {_spec(spec)}), "
                    "which moves data between devices. Optimize them in separate "
                    "optax.partition groups, or keep group_leaves=False."
                )
    return tuple(tuple(m) for m in groups.values())


def _spec(entries: tuple[Any, ...] | None) -> Any:
    return None if entries is None else jax.sharding.PartitionSpec(*entries)


def init_fields(fields: dict[str, Any], params: Any, dims: list[int], group_leaves: bool, who):
    """Per-leaf state ``fields``, or, with ``group_leaves``, each stacked per group.

    ``dims`` holds each leaf's batch axes (:func:`batch_dims_of`).
    """
    if not group_leaves or not jax.tree.leaves(params):
        return fields
    members = group_members(params, dims, who)
    return {name: group(tree, members) for name, tree in fields.items()}


def _field_leaves(tree: Any, name: str, kind: FieldKind, treedef: Any, who: str) -> list[Any]:
    """The leaves of one state field, checked to be one per update leaf."""
    if kind == "param" and jax.tree.structure(tree) != treedef:
        raise ValueError(
            f"{who}: the updates' tree structure does not match the optimizer state's "
            f"{name}.\n  updates: {treedef}\n  state:   {jax.tree.structure(tree)}\nPass "
            "updates with the tree structure of the parameters given to init."
        )
    leaves = jax.tree.leaves(tree)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            f"{who}: the updates have {treedef.num_leaves} leaves but the optimizer state's "
            f"{name} has {len(leaves)}. Pass updates with the tree structure of the parameters "
            "given to init."
        )
    return leaves


def _units(updates: Any, state: Any, fields: Mapping[str, FieldKind], who: str):
    """``(leaf indices, statistics)`` per unit of work: one leaf, or one group of leaves."""
    trees = [getattr(state, f) for f in fields]
    treedef = jax.tree.structure(updates)
    if not any(isinstance(t, Grouped) for t in trees):
        pairs = zip(trees, fields.items(), strict=True)
        stats = [_field_leaves(t, f, k, treedef, who) for t, (f, k) in pairs]
        return [((i,), s) for i, s in enumerate(zip(*stats, strict=True))], False
    if not all(isinstance(t, Grouped) for t in trees):
        raise ValueError(f"{who}: the optimizer state mixes grouped and per-leaf statistics.")
    members = trees[0].members
    if trees[0].treedef.num_leaves != treedef.num_leaves:
        raise ValueError(
            f"{who}: the updates have {treedef.num_leaves} leaves but the optimizer state's "
            f"groups hold {trees[0].treedef.num_leaves}. Pass updates with the tree structure "
            "of the parameters given to init."
        )
    stacks = zip(*(t.stacks for t in trees), strict=True)
    return list(zip(members, stacks, strict=True)), True


def update_leaves(
    step: Callable[..., tuple[Any, ...]],
    updates: Any,
    state: Any,
    fields: Mapping[str, FieldKind],
    axes_of: Callable[..., Any],
    batch_dims: Any,
    who: str,
) -> tuple[Any, dict[str, Any]]:
    """Runs ``step`` on each leaf of ``updates`` and the matching leaves of ``state``'s fields.

    ``step(g, axes, batch_dims, *stats) -> (out, *new_stats)`` gets the update leaf in its
    compute dtype, the leaf's factored axes (``axes_of(shape, batch_dims=b)``), its number of
    leading batch axes and one leaf of each field of ``fields``, in order. Where the state
    is :class:`Grouped`, ``step`` runs once per group on the group's leaves stacked along a
    new leading axis (one more batch axis) and their stacked statistics. Returns the outputs
    in the updates' structure and the new fields, each in the structure of the old one.
    Raises ValueError naming the first update leaf whose dtype, or whose statistics'
    shapes, do not fit.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths, leaves = [p for p, _ in flat], [x for _, x in flat]
    _checks.check_float_leaves(paths, leaves, "update", who)
    dims = batch_dims_of(batch_dims, updates, who)
    units, grouped = _units(updates, state, fields, who)
    outs: list[Any] = [None] * len(leaves)
    new: list[list[Any]] = [[] for _ in fields]
    for members, stats in units:
        first = members[0]
        shape, b = jnp.shape(leaves[first]), dims[first]
        axes = axes_of(shape, batch_dims=b)
        for i in members:
            if jnp.shape(leaves[i]) != shape or dims[i] != b:
                raise ValueError(
                    f"{who}: the update {_checks.leaf_name(paths[i])} has shape "
                    f"{jnp.shape(leaves[i])} (batch_dims {dims[i]}), but the optimizer state "
                    f"groups it with leaves of shape {shape} (batch_dims {b}). Pass updates with "
                    "the tree structure and shapes of the parameters given to init."
                )
        for (name, kind), stat in zip(fields.items(), stats, strict=True):
            expected = _expected_shape(kind, shape, axes)
            if expected is not None and grouped:
                expected = (len(members), *expected)
            if expected is not None and tuple(jnp.shape(stat)) != expected:
                raise ValueError(
                    f"{who}: the update {_checks.leaf_name(paths[first])} has shape {shape}, but "
                    f"the optimizer state's {name} holds shape {jnp.shape(stat)} there "
                    f"(expected {expected}). Pass updates with the tree structure and shapes "
                    "of the parameters given to init."
                )
        g = [leaves[i].astype(compute_dtype(leaves[i].dtype)) for i in members]
        if grouped:
            stacked_axes = None if axes is None else (axes[0] + 1, axes[1] + 1)
            out, *results = step(jnp.stack(g), stacked_axes, b + 1, *stats)
            for j, i in enumerate(members):
                outs[i] = out[j]
        else:
            out, *results = step(g[0], axes, b, *stats)
            outs[first] = out
        for column, result in zip(new, results, strict=True):
            column.append(result)
    trees = [getattr(state, f) for f in fields]
    if grouped:
        rebuilt = [dataclasses.replace(t, stacks=tuple(c)) for t, c in zip(trees, new, strict=True)]
    else:
        rebuilt = [like(t, c) for t, c in zip(trees, new, strict=True)]
    return jax.tree.unflatten(treedef, outs), dict(zip(fields, rebuilt, strict=True))
