"""Where per-parameter statistics live in the optimizer state.

Every statistic CAME keeps is a tree with the parameters' structure, so that
``optax.tree.map_params`` and ``optax.tree.get`` work on the state as they do
on ``optax.adam``'s. Two kinds of tree are built:

* the parameters' own structure (``jax.tree.map`` over them), metadata boxes included. A
  momentum has its parameter's shape, so Flax's ``nnx.Variable`` or linen's
  ``nn.Partitioned`` annotations (its sharding) apply to it unchanged.
* ``unboxed``: the same containers with each metadata box replaced by its
  array. Row and column statistics have fewer axes than their parameter, so a
  copy of the parameter's sharding annotation would be wrong for them.

A leaf that a statistic does not apply to (a row statistic of a vector, say)
holds a one-element placeholder, as ``optax.adafactor`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


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


def placeholder(dtype: Any = jnp.float32) -> jax.Array:
    """The one-element stand-in for a statistic a leaf does not keep."""
    return jnp.zeros((1,), dtype)


def leaves_of(tree: Any, count: int, field: str, who: str) -> list[Any]:
    """The leaves of a statistics tree, checked to be one per update leaf."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) != count:
        raise ValueError(
            f"{who}: the updates have {count} leaves but the optimizer state's {field} has "
            f"{len(leaves)}. Pass updates with the tree structure of the parameters given "
            "to init."
        )
    return leaves


def like(tree: Any, leaves: list[Any]) -> Any:
    """``leaves`` in the structure of ``tree``."""
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def unzip(rows: list[tuple[Any, ...]], n: int) -> tuple[list[Any], ...]:
    """Transposes a list of n-tuples into n lists (n empty lists for no rows)."""
    return tuple([r[i] for r in rows] for i in range(n))
