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


def resolve_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """Canonicalises a dtype argument, raising a ValueError for non-dtypes."""
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
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {resolved}.")
    return resolved


def check_float_leaves(tree_leaves: list[Any], what: str) -> None:
    """Raises TypeError for integer, boolean or complex leaves."""
    for i, leaf in enumerate(tree_leaves):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"CAME does not support complex {what}: leaf {i} has dtype {dtype}. "
                "Optimise the real and imaginary parts as separate real leaves."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"CAME needs floating-point {what}: leaf {i} has dtype {dtype}. "
                "Integer and boolean leaves cannot be optimised; exclude them with "
                "optax.masked or optax.partition."
            )
