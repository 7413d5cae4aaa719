"""Factored second-moment scaling: CAME's first stage, and the factored EMA it shares.

A matrix-shaped statistic ``X`` (``g**2`` here, the instability in
:mod:`came_optax._confidence`) is tracked by two exponential moving averages of
its means, one per kept axis, instead of a full copy. Its reconstruction

.. math::

  \\hat X_{ij} = \\frac{R_i\\, C_j}{\\operatorname{mean}_k R_k}

is never materialised: callers multiply by the two broadcastable factors
returned by :func:`rsqrt_factors`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from came_optax import _checks

FactoredDims = Literal["last_two", "largest_two"]


class FactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rms`.

    The statistics are tuples with one entry per leaf of the parameters (in
    ``jax.tree.leaves`` order), so the rank-reduced arrays never inherit metadata
    such as ``nnx.Variable`` or ``nn.Partitioned`` annotations of their parameter.

    Attributes:
      count: number of updates applied so far (int32).
      v_row: per leaf, the EMA of row means of ``g**2 + eps1`` (the parameter's
        shape without its column axis), or None where the leaf is not factored.
      v_col: per leaf, the EMA of column means (the shape without the row axis),
        or None where the leaf is not factored.
      v: per leaf, the full EMA of ``g**2 + eps1`` where the leaf is not
        factored, else None.
    """

    count: jax.Array
    v_row: tuple[jax.Array | None, ...]
    v_col: tuple[jax.Array | None, ...]
    v: tuple[jax.Array | None, ...]


def factored_axes(
    shape: tuple[int, ...],
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
) -> tuple[int, int] | None:
    """Which two axes of a leaf are factored, or None to keep a full statistic.

    Args:
      shape: the leaf's shape.
      factored_dims: ``"last_two"`` factors the last two axes of every leaf of
        rank >= 2, as came-pytorch does; ``"largest_two"`` factors the two largest
        axes, as ``optax.adafactor`` does.
      min_dim_size_to_factor: if set, a leaf is factored only when both chosen
        axes have at least this size (``optax.adafactor`` uses 128). None, the
        default, factors regardless of size, as came-pytorch does.

    Returns:
      ``(row_axis, col_axis)`` with ``row_axis < col_axis``: the row statistic
      averages over ``col_axis`` and the column statistic over ``row_axis``.
      None for scalars, vectors and empty leaves.

    Example:
      >>> from came_optax import factored_axes
      >>> factored_axes((3, 3, 64, 128))
      (2, 3)
      >>> factored_axes((3, 3, 64, 128), 'largest_two', min_dim_size_to_factor=128) is None
      True
    """
    if len(shape) < 2 or 0 in shape:
        return None
    if factored_dims == "last_two":
        axes = (len(shape) - 2, len(shape) - 1)
    elif factored_dims == "largest_two":
        # Stable sort: among equal sizes the later axes win, like the reference.
        order = sorted(range(len(shape)), key=lambda a: (shape[a], a))
        axes = tuple(sorted(order[-2:]))
    else:
        raise ValueError(
            f"factored_dims must be 'last_two' or 'largest_two'; got {factored_dims!r}."
        )
    if min_dim_size_to_factor is not None and min(shape[a] for a in axes) < min_dim_size_to_factor:
        return None
    return axes


def check_factoring_args(factored_dims: Any, min_dim_size_to_factor: Any) -> None:
    """Validates the static factoring options at construction."""
    if factored_dims not in ("last_two", "largest_two"):
        raise ValueError(
            f"factored_dims must be 'last_two' or 'largest_two'; got {factored_dims!r}."
        )
    _checks.check_static_int("min_dim_size_to_factor", min_dim_size_to_factor, 1)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are kept in: float32, or float64 for float64 leaves."""
    return jnp.promote_types(dtype, jnp.float32)


def zeros_like_param(leaf: Any, dtype: Any) -> jax.Array:
    """Zeros of ``leaf``'s shape in ``dtype``, sharded like ``leaf`` even under ``jax.jit``.

    Inside ``jax.jit`` with auto axis types a constant is tied to no input, so the
    partitioner would replicate it; ``shard_alike`` ties it to the parameter. Concrete
    arrays and explicit axis types carry their sharding already. Inside ``shard_map``
    with manual axes each device holds its own block, so there is nothing to tie.
    """
    zeros = jnp.zeros_like(leaf, dtype=dtype)
    if isinstance(leaf, jax.core.Tracer) and not jax.sharding.get_abstract_mesh().manual_axes:
        zeros = shard_alike(leaf, zeros)[1]
    return zeros


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` in float32, accurate for decays close to 1.

    A concrete ``decay`` is taken to log space in float64, so ``b3 = 0.9999`` is not
    first rounded to float32 (which alone would move ``1 - b3`` by ~6e-4 relative).
    """
    value = _checks.concrete_value(decay)
    if value is not None:
        log_decay = jnp.float32(np.log(value)) if value > 0 else jnp.float32(-np.inf)
    else:
        log_decay = jnp.log(jnp.asarray(decay, jnp.float32))
    return -jnp.expm1(count.astype(jnp.float32) * log_decay)


def init_moments(
    leaf: Any, axes: tuple[int, int] | None
) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """Zero ``(row, col, full)`` statistics for one leaf; unused entries are None.

    Row and column statistics are reductions of parameter-shaped zeros, so they are
    sharded like the parameter with the reduced axis removed.
    """
    if axes is not None and not isinstance(leaf, jax.core.Tracer):
        # Compiled, the parameter-shaped zeros are folded away instead of allocated.
        return _init_moments_compiled(leaf, axes)
    zeros = zeros_like_param(leaf, compute_dtype(jnp.result_type(leaf)))
    if axes is None:
        return None, None, zeros
    row_axis, col_axis = axes
    return jnp.sum(zeros, axis=col_axis), jnp.sum(zeros, axis=row_axis), None


_init_moments_compiled = jax.jit(init_moments, static_argnums=1)


def moment_means(x: jax.Array, axes: tuple[int, int] | None) -> tuple[jax.Array, ...]:
    """``(row means, column means)`` of ``x`` for a factored leaf, else ``(x,)``."""
    if axes is None:
        return (x,)
    row_axis, col_axis = axes
    return jnp.mean(x, axis=col_axis), jnp.mean(x, axis=row_axis)


def ema_moments(
    means: tuple[jax.Array, ...],
    row: jax.Array | None,
    col: jax.Array | None,
    full: jax.Array | None,
    axes: tuple[int, int] | None,
    decay: jax.Array | float,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """Folds this step's ``means`` (from :func:`moment_means`) into the EMAs."""
    if axes is None:
        return None, None, decay * full + (1.0 - decay) * means[0]
    return decay * row + (1.0 - decay) * means[0], decay * col + (1.0 - decay) * means[1], None


# Largest entry a gradient is rescaled to when its square overflows (see guard_overflow).
SAFE_MAX_EXPONENT = 50


def guard_overflow(
    g: jax.Array, means: tuple[jax.Array, ...], square_means
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Rescales a leaf whose squared gradient overflowed, by a power of two.

    ``means`` are this step's means of ``g**2 + eps1``; ``square_means(scale)``
    recomputes them for ``g * scale``. When they are all finite (always, unless
    some ``|g|`` exceeds about 1.8e19) the scale is exactly 1 and nothing changes.
    Otherwise ``g`` is scaled so its largest entry is ``2**50``: CAME's update is
    invariant to the gradient's scale except through ``eps1`` and the EMA
    history, so this keeps training finite where float32 arithmetic (and
    came-pytorch) would produce NaN. Non-finite gradients are passed through.
    """

    def rescaled(_):
        gmax = jnp.max(jnp.abs(g), initial=0)
        ok = jnp.isfinite(gmax) & (gmax > 0)
        exponent = jnp.ceil(jnp.log2(jnp.where(ok, gmax, 1.0))).astype(jnp.int32)
        scale = jnp.where(ok, jnp.ldexp(jnp.ones((), g.dtype), SAFE_MAX_EXPONENT - exponent), 1)
        return scale.astype(g.dtype), square_means(scale)

    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in means]))
    return jax.lax.cond(finite, lambda _: (jnp.ones((), g.dtype), means), rescaled, None)


def rsqrt_factors(
    row: jax.Array | None,
    col: jax.Array | None,
    full: jax.Array | None,
    axes: tuple[int, int] | None,
    correction: jax.Array | float | None = None,
) -> tuple[jax.Array, ...]:
    """Broadcastable factors whose product is ``rsqrt(X / correction)``.

    Returns one full-shape factor for an unfactored leaf, and a row factor and a
    column factor (each with a size-one axis where the other varies) for a
    factored one, so that ``x * prod(factors)`` fuses into one elementwise loop.
    """
    if axes is None:
        return (jax.lax.rsqrt(full if correction is None else full / correction),)
    row_axis, col_axis = axes
    r_vector, c_vector = rsqrt_vectors(row, col, axes, correction)
    return jnp.expand_dims(r_vector, col_axis), jnp.expand_dims(c_vector, row_axis)


def rsqrt_vectors(
    row: jax.Array,
    col: jax.Array,
    axes: tuple[int, int],
    correction: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The row and column factors of :func:`rsqrt_factors`, before broadcasting."""
    normalised = row / jnp.mean(row, axis=axes[0], keepdims=True)
    if correction is not None:
        normalised = normalised / correction
    return jax.lax.rsqrt(normalised), jax.lax.rsqrt(col)


def scale_with(x: jax.Array, factors: tuple[jax.Array, ...]) -> jax.Array:
    """``x`` times the reconstructed inverse square root, in the reference's order."""
    if len(factors) == 1:
        return factors[0] * x
    r_factor, c_factor = factors
    return (r_factor * c_factor) * x


def check_leaves(
    leaves: list[Any],
    axes: list[tuple[int, int] | None],
    rows: tuple,
    fulls: tuple,
    who: str,
) -> None:
    """Raises ValueError when updates do not match the tree the state was built for."""
    if len(leaves) != len(rows):
        raise ValueError(
            f"{who}: the updates have {len(leaves)} leaves but the optimizer state was "
            f"initialised for {len(rows)}. Pass updates with the same tree structure as "
            "the parameters given to init."
        )
    for i, (leaf, a, row, full) in enumerate(zip(leaves, axes, rows, fulls, strict=True)):
        shape = jnp.shape(leaf)
        if a is None:
            ok = full is not None and full.shape == shape
        else:
            ok = row is not None and row.shape == shape[: a[1]] + shape[a[1] + 1 :]
        if not ok:
            raise ValueError(
                f"{who}: update leaf {i} has shape {shape}, which does not match the "
                "optimizer state initialised for the parameters. Pass updates with the same "
                "tree structure and shapes as the parameters given to init."
            )


def scale_by_factored_rms(
    b2: float | jax.Array = 0.999,
    eps1: float | jax.Array = 1e-30,
    *,
    debias: bool = False,
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformation:
    r"""Scales updates by the inverse root of a factored second-moment estimate.

    CAME's first stage (Luo et al., 2023, Algorithm 1, lines 3-6), the same
    preconditioner as Adafactor's. For each leaf with gradient :math:`g`, with
    :math:`s = g^2 + \epsilon_1`:

    * factored leaves (by default every leaf of rank >= 2, over its last two
      axes):

      .. math::

        R_t = \beta_2 R_{t-1} + (1-\beta_2)\operatorname{mean}_{\text{col}}(s),\quad
        C_t = \beta_2 C_{t-1} + (1-\beta_2)\operatorname{mean}_{\text{row}}(s),\quad
        V_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)}

    * other leaves: :math:`V_t = \beta_2 V_{t-1} + (1-\beta_2) s`.

    The output is :math:`u_t = g / \sqrt{V_t}`. The outer product is never
    formed. Statistics are kept in float32 whatever the gradient dtype (float64
    for float64 leaves) and the output is in that dtype too.

    With ``debias=True`` (an option beyond the paper and came-pytorch)
    :math:`V_t` is replaced by :math:`V_t / (1 - \beta_2^t)`, as Adam corrects
    its second moment.

    A leaf whose :math:`g^2` overflows float32 (some :math:`|g|` above about
    1.8e19) is first multiplied by a power of two that brings its largest entry
    to :math:`2^{50}`, where came-pytorch would produce NaN; below that nothing
    changes.

    Args:
      b2: decay of the second-moment EMAs, in [0, 1). May be scheduled or
        injected.
      eps1: added to :math:`g^2` before averaging, >= 0.
      debias: divide the estimate by :math:`1-\beta_2^t`. Off in the reference.
      factored_dims: which axes to factor; see :func:`factored_axes`.
      min_dim_size_to_factor: minimum size of both factored axes; None (the
        reference) factors every leaf of rank >= 2.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`FactoredRmsState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import scale_by_factored_rms
      >>> tx = optax.chain(scale_by_factored_rms(), optax.scale(-1e-3))
      >>> params = {'w': jnp.ones((4, 3))}
      >>> updates, state = tx.update({'w': jnp.full((4, 3), 0.5)}, tx.init(params))
      >>> updates['w'].shape
      (4, 3)

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
      Optimization, ACL 2023 (arXiv:2307.02047); Shazeer & Stern, Adafactor,
      ICML 2018 (arXiv:1804.04235).
    """
    _checks.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps1", eps1, 0.0)
    check_factoring_args(factored_dims, min_dim_size_to_factor)

    def leaf_axes(leaves):
        return [factored_axes(jnp.shape(x), factored_dims, min_dim_size_to_factor) for x in leaves]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        _checks.check_float_leaves(leaves, "parameters")
        moments = [init_moments(x, a) for x, a in zip(leaves, leaf_axes(leaves), strict=True)]
        rows, cols, fulls = (tuple(m) for m in zip(*moments, strict=True)) if moments else ((),) * 3
        return FactoredRmsState(jnp.zeros([], jnp.int32), rows, cols, fulls)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        axes = leaf_axes(leaves)
        check_leaves(leaves, axes, state.v_row, state.v, "scale_by_factored_rms")
        _checks.check_float_leaves(leaves, "updates")
        count = optax.safe_increment(state.count)
        correction = bias_correction(b2, count) if debias else None
        outs, rows, cols, fulls = [], [], [], []
        for g, row, col, full, a in zip(
            leaves, state.v_row, state.v_col, state.v, axes, strict=True
        ):
            g = g.astype(compute_dtype(g.dtype))
            square_means = lambda scale, g=g, a=a: moment_means(jnp.square(g * scale) + eps1, a)
            scale, means = guard_overflow(g, square_means(1), square_means)
            row, col, full = ema_moments(means, row, col, full, a, b2)
            outs.append(scale_with(g * scale, rsqrt_factors(row, col, full, a, correction)))
            rows.append(row)
            cols.append(col)
            fulls.append(full)
        new_state = FactoredRmsState(count, tuple(rows), tuple(cols), tuple(fulls))
        return jax.tree.unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)
