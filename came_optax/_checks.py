"""Construction-time validation shared by the CAME transformations.

Hyperparameters that a user may schedule or inject arrive as Python numbers,
NumPy scalars, concrete arrays or tracers. Concrete values are checked when the
transformation is built; traced values (for example those fed by
``optax.inject_hyperparams`` inside ``jax.jit``) cannot be inspected and are
passed through unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
    """Returns ``value`` as a Python float, or None if it is traced or not a scalar."""
    if value is None or callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything that is not array-like is checked elsewhere
        return None
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError naming ``name`` if a concrete ``value`` is out of range."""
    x = concrete_value(value)
    if x is None:
        return
    below = low is not None and (x < low if low_inclusive else x <= low)
    above = high is not None and (x > high if high_inclusive else x >= high)
    if math.isnan(x) or below or above:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {lo}, {hi}; got {x!r}.")


def check_static_int(name: str, value: Any, minimum: int) -> None:
    """Raises ValueError unless ``value`` is None or a Python int >= ``minimum``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{name} must be a Python int decided at trace time, got {type(value).__name__}. "
            f"With optax.inject_hyperparams, pass static_args=('{name}',)."
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")


def check_bool(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a Python bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a Python bool decided at trace time; got {value!r}.")


def resolve_dtype(name: str, dtype: Any, integers: tuple[str, ...] = ()) -> jnp.dtype | None:
    """Canonicalises a dtype argument, raising a ValueError for non-dtypes.

    Floating and complex dtypes are accepted, and the integer dtypes named in ``integers``
    (``("int8",)`` for a block-quantized momentum).
    """
    if dtype is None:
        return None
    if isinstance(dtype, jax.Array | np.ndarray):
        raise ValueError(
            f"{name} must be a dtype such as jnp.bfloat16 or 'bfloat16', got an array. "
            f"optax.inject_hyperparams treats dtype classes as schedules: pass {name} as a "
            f"string or use static_args=('{name}',)."
        )
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{name} must be a floating dtype, got {dtype!r}.") from e
    if not jnp.issubdtype(resolved, jnp.inexact) and resolved.name not in integers:
        allowed = "".join(f" or '{i}'" for i in integers)
        raise ValueError(f"{name} must be a floating or complex dtype{allowed}, got {resolved}.")
    return resolved


def leaf_name(path: jax.tree_util.KeyPath) -> str:
    """A leaf's key path as ``jax.tree_util.keystr`` prints it."""
    return jax.tree_util.keystr(path) or "the root leaf"


def check_float_leaves(paths: list[Any], leaves: list[Any], what: str, who: str) -> None:
    """Raises TypeError naming the first integer or boolean leaf."""
    for path, leaf in zip(paths, leaves, strict=True):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{who}: {what} {leaf_name(path)} has dtype {dtype}; CAME needs floating-point "
                "or complex leaves. Exclude integer and boolean leaves with optax.masked or "
                "optax.partition."
            )


def check_param_leaves(params: Any, who: str) -> None:
    """Validates the parameters given to ``init``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    check_float_leaves([p for p, _ in flat], [x for _, x in flat], "parameter", who)
