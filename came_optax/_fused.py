"""CAME's three preconditioning stages computed jointly, for speed.

:func:`came` keeps the state and the semantics of the chain
``scale_by_factored_rms -> clip_by_block_rms -> scale_by_confidence``, but its
update computes those stages together so that, for a factored leaf, XLA never
materialises a parameter-sized temporary: every full-size consumer (the two
second-moment reductions, the clip's mean square, the momentum, the two
instability reductions, the final update) recomputes the cheap elementwise
products from the gradient and small row/column vectors. Scalars such as the
clip factor and the bias correction are folded into those vectors.

Two XLA:CPU habits are worked around, each without changing any value:

* a producer shared by several reductions is materialised, which costs a fresh
  parameter-sized buffer per step; ``optimization_barrier`` gives each
  consumer its own copy of the *inputs* so the producer is fused into each;
* an elementwise epilogue fused into a reduction makes it several times
  slower; a no-op ``reduce_precision`` keeps the two apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from came_optax import _factored
from came_optax._confidence import ConfidenceState
from came_optax._factored import FactoredRmsState

_private = jax.lax.optimization_barrier


def _mean(x: jax.Array, axis) -> jax.Array:
    """``jnp.mean`` whose result is not fused with what follows (see module doc)."""
    info = jnp.finfo(x.dtype)
    total = jnp.sum(x, axis=axis)
    total = jax.lax.reduce_precision(total, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    count = x.size // max(total.size, 1)
    return total / count


def _factored_leaf(g, mu, row, col, r_row, r_col, axes, hp, corrections):
    """One factored leaf: returns (update, momentum, v_row, v_col, r_row, r_col)."""
    row_axis, col_axis = axes
    c2, c1, c3 = corrections

    def rows_(x):
        return jnp.expand_dims(x, col_axis)

    def cols_(x):
        return jnp.expand_dims(x, row_axis)

    def square_means(scale):
        if isinstance(scale, int):
            g_row, g_col = g, _private(g)
        else:
            # A scale vector, not a scalar: XLA:CPU would broadcast a scalar to a
            # parameter-sized buffer to fuse it into the reductions.
            along_cols = [g.shape[col_axis] if i == col_axis else 1 for i in range(g.ndim)]
            s = _private(jnp.full(along_cols, scale, g.dtype))
            g_row, g_col = g * s, _private(g) * _private(s)
        return (
            _mean(jnp.square(g_row), col_axis) + hp["eps1"],
            _mean(jnp.square(g_col), row_axis) + hp["eps1"],
        )

    scale, means = _factored.guard_overflow(g, square_means(1), square_means)
    row, col, _ = _factored.ema_moments(means, row, col, None, axes, hp["b2"])
    # u = rows_(r) * cols_(c) * g, with scalars folded into the row vector r.
    r, c = _factored.rsqrt_vectors(row, col, axes, c2)
    r = r * scale
    if hp["clip_threshold"] is not None:
        g_, r_, c_ = _private((g, r, c))
        mean_square = _mean(jnp.square((rows_(r_) * cols_(c_)) * g_), None)
        r = r / jnp.maximum(1.0, jnp.sqrt(mean_square) / hp["clip_threshold"])

    g_, r_, c_ = _private((g, r, c))
    b1 = hp["b1"]
    m = b1 * mu + (1.0 - b1) * ((rows_(r_) * cols_(c_)) * g_)

    g_, r_, c_, m_ = _private((g, r, c, m))
    instability_rows = _mean(jnp.square((rows_(r_) * cols_(c_)) * g_ - m_), col_axis)
    m_, g_, r_, c_ = _private((m, g, r, c))
    instability_cols = _mean(jnp.square((rows_(r_) * cols_(c_)) * g_ - m_), row_axis)
    eps2 = hp["eps2"]
    r_row, r_col, _ = _factored.ema_moments(
        (instability_rows + eps2, instability_cols + eps2), r_row, r_col, None, axes, hp["b3"]
    )
    s_r, s_c = _factored.rsqrt_vectors(r_row, r_col, axes, c3)
    if c1 is not None:
        s_r = s_r / c1
    update = (rows_(s_r) * cols_(s_c)) * m
    return update, m, row, col, r_row, r_col


def _unfactored_leaf(g, mu, full, hp, corrections):
    """One scalar or vector leaf: returns (update, momentum, v)."""
    c2, c1, _ = corrections

    def square_means(scale):
        return (jnp.square(g * scale) + hp["eps1"],)

    scale, means = _factored.guard_overflow(g, square_means(1), square_means)
    _, _, full = _factored.ema_moments(means, None, None, full, None, hp["b2"])
    u = (g * scale) * jax.lax.rsqrt(full if c2 is None else full / c2)
    if hp["clip_threshold"] is not None:
        rms = jnp.sqrt(jnp.mean(jnp.square(u)))
        u = u / jnp.maximum(1.0, rms / hp["clip_threshold"])
    m = hp["b1"] * mu + (1.0 - hp["b1"]) * u
    return (m if c1 is None else m / c1), m, full


def precondition(
    updates: Any,
    factored: FactoredRmsState,
    confidence: ConfidenceState,
    axes: list[tuple[int, int] | None],
    hp: dict[str, Any],
    debias: bool,
) -> tuple[Any, FactoredRmsState, ConfidenceState]:
    """The fused update of the three stages; validation is the caller's."""
    leaves, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(confidence.mu)
    count = optax.safe_increment(factored.count)
    if debias:
        corrections = (
            _factored.bias_correction(hp["b2"], count),
            _factored.bias_correction(hp["b1"], count),
            _factored.bias_correction(hp["b3"], count),
        )
    else:
        corrections = (None, None, None)
    outs, new_mus, v_rows, v_cols, vs, r_rows, r_cols = ([] for _ in range(7))
    for i, (g, mu, a) in enumerate(zip(leaves, mus, axes, strict=True)):
        cdt = _factored.compute_dtype(g.dtype)
        g = g.astype(cdt)
        if a is None:
            out, m, v = _unfactored_leaf(g, mu.astype(cdt), factored.v[i], hp, corrections)
            row = col = r_row = r_col = None
        else:
            v = None
            out, m, row, col, r_row, r_col = _factored_leaf(
                g,
                mu.astype(cdt),
                factored.v_row[i],
                factored.v_col[i],
                confidence.r_row[i],
                confidence.r_col[i],
                a,
                hp,
                corrections,
            )
        outs.append(out)
        new_mus.append(m.astype(mu.dtype))
        v_rows.append(row)
        v_cols.append(col)
        vs.append(v)
        r_rows.append(r_row)
        r_cols.append(r_col)
    new_factored = FactoredRmsState(count, tuple(v_rows), tuple(v_cols), tuple(vs))
    new_confidence = ConfidenceState(
        optax.safe_increment(confidence.count),
        jax.tree.unflatten(treedef, new_mus),
        tuple(r_rows),
        tuple(r_cols),
    )
    return jax.tree.unflatten(treedef, outs), new_factored, new_confidence
