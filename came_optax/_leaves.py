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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from came_optax import _checks

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


def unzip_tree(fn: Callable[[Any], tuple[Any, ...]], params: Any, n: int) -> tuple[Any, ...]:
    """``n`` trees (without boxes) from ``fn`` of each parameter array, which returns n values."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_box)
    results = [fn(_unbox(x)) for x in leaves]
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


def update_leaves(
    step: Callable[..., tuple[Any, ...]],
    updates: Any,
    state: Any,
    fields: Mapping[str, FieldKind],
    axes_of: Callable[[tuple[int, ...]], Any],
    who: str,
) -> tuple[Any, dict[str, Any]]:
    """Runs ``step`` on each leaf of ``updates`` and the matching leaves of ``state``'s fields.

    ``step(g, axes, *stats) -> (out, *new_stats)`` gets the update leaf in its compute dtype,
    the leaf's factored axes (``axes_of(shape)``) and one leaf of each field of ``fields``, in
    order. Returns the outputs in the updates' structure and the new fields, each in the
    structure of the old one. Raises ValueError naming the first update leaf whose dtype,
    or whose statistics' shapes, do not fit.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths, leaves = [p for p, _ in flat], [x for _, x in flat]
    _checks.check_float_leaves(paths, leaves, "update", who)
    stats = [_field_leaves(getattr(state, f), f, k, treedef, who) for f, k in fields.items()]
    results = []
    for path, g, *leaf_stats in zip(paths, leaves, *stats, strict=True):
        axes = axes_of(jnp.shape(g))
        for (name, kind), stat in zip(fields.items(), leaf_stats, strict=True):
            expected = _expected_shape(kind, jnp.shape(g), axes)
            if expected is not None and tuple(jnp.shape(stat)) != expected:
                raise ValueError(
                    f"{who}: the update {_checks.leaf_name(path)} has shape {jnp.shape(g)}, but "
                    f"the optimizer state's {name} holds shape {jnp.shape(stat)} there "
                    f"(expected {expected}). Pass updates with the tree structure and shapes "
                    "of the parameters given to init."
                )
        results.append(step(g.astype(compute_dtype(g.dtype)), axes, *leaf_stats))
    columns = [[r[i] for r in results] for i in range(len(fields) + 1)]
    new = {f: like(getattr(state, f), c) for f, c in zip(fields, columns[1:], strict=True)}
    return jax.tree.unflatten(treedef, columns[0]), new
