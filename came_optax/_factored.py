r"""Factored second moment: CAME's first stage, and the factored EMA it shares.

A matrix-shaped statistic ``X`` (:math:`|g|^2` here, the instability in
:mod:`came_optax._confidence`) is tracked by two exponential moving averages of
its means, one per kept axis, instead of a full copy. Its reconstruction

.. math::

  \hat X_{ij} = \frac{R_i\, C_j}{\operatorname{mean}_k R_k}

is never materialised: callers multiply by the row and column vectors of
:func:`inverse_root_vectors`. The per-leaf functions here are the only
statement of this math; :func:`scale_by_factored_second_moment`,
:func:`came_optax.scale_by_confidence` and :func:`came_optax.scale_by_came`
call them.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from came_optax import _checks, _leaves

FactoredDims = Literal["last_two", "largest_two"]
Axes = tuple[int, int] | None


class FactoredSecondMomentState(NamedTuple):
    r"""State of :func:`scale_by_factored_second_moment`.

    Each statistic is a tree with the parameters' structure (metadata boxes
    such as ``nnx.Variable`` removed); a leaf that does not keep a statistic
    holds a one-element placeholder there.

    Attributes:
      count: number of updates applied so far (int32).
      v_row: per leaf, the EMA of row means of :math:`|g|^2 + \epsilon_1` (the
        parameter's shape without its column axis) where the leaf is factored.
      v_col: per leaf, the EMA of column means (the shape without the row axis)
        where the leaf is factored.
      v: per leaf, the full EMA of :math:`|g|^2 + \epsilon_1` where the leaf is
        not factored.
    """

    count: jax.Array
    v_row: optax.Params
    v_col: optax.Params
    v: optax.Params


def check_factoring_args(factored_dims: Any, min_dim_size_to_factor: Any) -> None:
    """Validates the static factoring options."""
    if factored_dims not in ("last_two", "largest_two"):
        raise ValueError(
            f"factored_dims must be 'last_two' or 'largest_two'; got {factored_dims!r}."
        )
    _checks.check_static_int("min_dim_size_to_factor", min_dim_size_to_factor, 1)


def factored_axes(
    shape: tuple[int, ...],
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
    batch_dims: int = 0,
) -> Axes:
    """Which two axes of a leaf are factored, or None to keep a full statistic.

    Only the axes after the first ``batch_dims`` are candidates: a leaf of shape
    ``(layers, *s)`` with ``batch_dims=1`` is factored on the axes a leaf of shape ``s``
    would be, shifted by one.

    Args:
      shape: the leaf's shape.
      factored_dims: ``"last_two"`` factors the last two axes of every leaf of
        rank >= 2, as came-pytorch does; ``"largest_two"`` factors the two largest
        axes, as ``optax.adafactor`` does.
      min_dim_size_to_factor: if set, a leaf is factored only when both chosen
        axes have at least this size (``optax.adafactor`` uses 128). None, the
        default, factors regardless of size, as came-pytorch does.
      batch_dims: the number of leading axes that hold independent copies (layers of a
        scanned model); they are never factored.

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
      >>> factored_axes((12, 768)), factored_axes((12, 768), batch_dims=1) is None
      ((0, 1), True)

    References:
      Shazeer & Stern, Adafactor, ICML 2018 (arXiv:1804.04235), section 3.
    """
    check_factoring_args(factored_dims, min_dim_size_to_factor)
    _checks.check_static_int("batch_dims", batch_dims, 0)
    if batch_dims > len(shape):
        raise ValueError(f"batch_dims={batch_dims} exceeds the rank of shape {tuple(shape)}.")
    copy = tuple(shape[batch_dims:])
    if len(copy) < 2 or 0 in copy:
        return None
    if factored_dims == "last_two":
        axes = (len(copy) - 2, len(copy) - 1)
    else:
        # Stable sort: among equal sizes the later axes win, like the reference.
        order = sorted(range(len(copy)), key=lambda a: (copy[a], a))
        axes = tuple(sorted(order[-2:]))
    if min_dim_size_to_factor is not None and min(copy[a] for a in axes) < min_dim_size_to_factor:
        return None
    return (axes[0] + batch_dims, axes[1] + batch_dims)


def abs_square(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real for complex ``x``."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def saturate(x: jax.Array) -> jax.Array:
    """``x``, at most the largest value whose reciprocal is normal (8.5e37 in float32).

    An infinity becomes that value; dividing by it cannot flush to zero.
    """
    return jnp.minimum(x, 1 / jnp.finfo(x.dtype).tiny)


def mean(x: jax.Array, axis: int) -> jax.Array:
    r"""The mean along ``axis``, saturated (:func:`saturate`) where its sum overflows.

    Sums of float32 squares overflow from :math:`|g|` of about :math:`10^{19} / \sqrt{n}`;
    saturated, the statistics stay finite for every finite gradient.
    """
    return saturate(jnp.mean(x, axis=axis))


def ema(old: jax.Array, new: jax.Array, decay: Any) -> jax.Array:
    """One exponential-moving-average step."""
    return decay * old + (1.0 - decay) * new


def bias_correction(decay: Any, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``1 - decay**count`` in ``dtype``, accurate for decays close to 1.

    A concrete ``decay`` is taken to log space in float64, so ``b3 = 0.9999`` is not
    first rounded to float32 (which alone would move ``1 - b3`` by ~6e-4 relative).
    """
    value = _checks.concrete_value(decay)
    if value is not None:
        log_decay = jnp.asarray(np.log(value) if value > 0 else -np.inf, dtype)
    else:
        log_decay = jnp.log(jnp.asarray(decay, dtype))
    return -jnp.expm1(count.astype(dtype) * log_decay)


def bias_corrections(decays: tuple[Any, ...], count: jax.Array, dtype: Any, debias: bool):
    """:func:`bias_correction` of each decay, or Nones without ``debias``."""
    return tuple(bias_correction(d, count, dtype) if debias else None for d in decays)


def factored_ema(
    x: jax.Array, row: jax.Array, col: jax.Array, axes: tuple[int, int], decay: Any, eps: Any
) -> tuple[jax.Array, jax.Array]:
    """The row and column EMAs after one more full-size statistic ``x + eps``."""
    row_axis, col_axis = axes
    return (
        ema(row, mean(x, col_axis) + eps, decay),
        ema(col, mean(x, row_axis) + eps, decay),
    )


def inverse_root_vectors(
    row: jax.Array, col: jax.Array, axes: tuple[int, int], correction: Any = None
) -> tuple[jax.Array, jax.Array]:
    r"""Row and column vectors whose outer product is :math:`(\hat X / c)^{-1/2}`.

    They are :math:`R^{-1/2}` and :math:`(C / (c \operatorname{mean} R))^{-1/2}`.
    """
    # The mean lacks both factored axes; the column statistic lacks only the row axis, so the
    # column axis goes back at its position there, axes[1] - 1.
    row_mean = jnp.expand_dims(mean(row, axes[0]), axes[1] - 1)
    if correction is not None:
        row_mean = row_mean * correction
    return jax.lax.rsqrt(row), jax.lax.rsqrt(col / row_mean)


def outer(x: jax.Array, r: jax.Array, c: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """``x`` times the outer product of a row vector ``r`` and a column vector ``c``."""
    row_axis, col_axis = axes
    return x * (jnp.expand_dims(r, col_axis) * jnp.expand_dims(c, row_axis))


def second_moment(
    g: jax.Array,
    row: jax.Array,
    col: jax.Array,
    full: jax.Array,
    axes: Axes,
    b2: Any,
    eps1: Any,
    correction: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One leaf of the stage: returns ``(g / sqrt(V_t), row, col, full)``."""
    if axes is None:
        full = ema(full, saturate(abs_square(g) + eps1), b2)
        v_hat = full if correction is None else full / correction
        return g * jax.lax.rsqrt(v_hat), row, col, full
    row, col = factored_ema(abs_square(g), row, col, axes, b2, eps1)
    return outer(g, *inverse_root_vectors(row, col, axes, correction), axes), row, col, full


def zeros_like_param(leaf: Any, dtype: Any) -> jax.Array:
    """Zeros of ``leaf``'s shape in ``dtype``, placed like ``leaf`` where jax knows its sharding.

    That is for a concrete array, and under ``jax.jit`` with explicit axis types; under
    ``jax.jit`` with auto axis types a constant is tied to no input (as ``optax.adam``'s
    zeros are): pass ``out_shardings`` (:func:`came_optax.state_shardings`) there.
    """
    return jnp.zeros_like(leaf, dtype=dtype)


def init_stats(leaf: Any, axes: Axes) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero ``(row, col, full)`` statistics for one leaf, placeholders where unused.

    Row and column statistics are sums of parameter-shaped zeros, so they are placed
    like the parameter with the reduced axis removed. Compiled, the zeros are folded away;
    an eager ``init`` allocates them for a moment, one leaf at a time.
    """
    dtype = _leaves.stat_dtype(jnp.result_type(leaf))
    zeros = zeros_like_param(leaf, dtype)
    if axes is None:
        return _leaves.placeholder(dtype), _leaves.placeholder(dtype), zeros
    row_axis, col_axis = axes
    return jnp.sum(zeros, col_axis), jnp.sum(zeros, row_axis), _leaves.placeholder(dtype)


def init_second_moment(
    params: Any, factored_dims: FactoredDims, min_dim: int | None, dims: list[int]
) -> tuple[Any, Any, Any]:
    """``(v_row, v_col, v)`` trees of zeros for ``params`` (see the state's docstring).

    ``dims`` holds each leaf's batch axes, in ``jax.tree.leaves`` order.
    """

    def init(x, b):
        return init_stats(x, factored_axes(jnp.shape(x), factored_dims, min_dim, b))

    return _leaves.unzip_tree(init, params, 3, dims)


STAT_FIELDS = {"v_row": "row", "v_col": "col", "v": "full"}


def scale_by_factored_second_moment(
    b2: float | jax.Array = 0.999,
    eps1: float | jax.Array = 1e-30,
    *,
    debias: bool = False,
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
    batch_dims: Any = None,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    r"""Scales updates by the inverse root of CAME's factored second moment.

    CAME's first stage (Luo et al., 2023, Algorithm 1, lines 3-6), Adafactor's
    preconditioner with a constant decay and no update clipping or relative step
    (unlike ``optax.scale_by_factored_rms``, which is Adafactor's with its decay
    schedule). For each leaf with gradient :math:`g`, with
    :math:`s = |g|^2 + \epsilon_1`:

    * factored leaves (by default every leaf of rank >= 2, over its last two
      axes):

      .. math::

        R_t = \beta_2 R_{t-1} + (1-\beta_2)\operatorname{mean}_{\text{col}}(s),\quad
        C_t = \beta_2 C_{t-1} + (1-\beta_2)\operatorname{mean}_{\text{row}}(s),\quad
        V_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)}

    * other leaves: :math:`V_t = \beta_2 V_{t-1} + (1-\beta_2) s`.

    The output is :math:`u_t = g / \sqrt{V_t}`. The outer product is never
    formed. Statistics are kept in float32 whatever the gradient dtype (float64
    for 64-bit leaves) and the output is float32 (complex64 for complex
    gradients, whose statistics use :math:`|g|^2`, as ``optax.adam`` does).

    With ``debias=True`` (an option beyond the paper and came-pytorch)
    :math:`V_t` is replaced by :math:`V_t / (1 - \beta_2^t)`, as Adam corrects
    its second moment.

    Where a mean's sum overflows float32 (squares of :math:`|g|` from about
    :math:`10^{19} / \sqrt{n}`; came-pytorch's state turns to NaN there), the
    mean saturates at 8.5e37 instead (beyond the reference): every finite
    gradient keeps the state finite, and nothing changes while the means stay
    below that (:math:`|g|` below about 9e18). A NaN or Inf gradient enters the state
    for good, as in came-pytorch: wrap the optimizer in
    ``optax.apply_if_finite`` to skip such steps.

    Args:
      b2: decay of the second-moment EMAs, in [0, 1). May be scheduled or
        injected.
      eps1: added to :math:`|g|^2` before averaging, >= 0.
      debias: divide the estimate by :math:`1-\beta_2^t`. Off in the reference.
      factored_dims: which axes to factor; see :func:`factored_axes`.
      min_dim_size_to_factor: minimum size of both factored axes; None (the
        reference) factors every leaf of rank >= 2.
      batch_dims: leading axes of each leaf that hold independent copies (see
        :func:`came_optax.came`); they are never factored.
      group_leaves: keep the statistics stacked per group of same-shaped leaves
        and update each group at once (see :func:`came_optax.came`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`FactoredSecondMomentState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import scale_by_factored_second_moment
      >>> tx = optax.chain(scale_by_factored_second_moment(), optax.scale(-1e-3))
      >>> params = {'w': jnp.ones((4, 3))}
      >>> updates, state = tx.update({'w': jnp.full((4, 3), 0.5)}, tx.init(params))
      >>> updates['w'].shape, state[0].v_row['w'].shape
      ((4, 3), (4,))

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
      Optimization, ACL 2023 (arXiv:2307.02047); Shazeer & Stern, Adafactor,
      ICML 2018 (arXiv:1804.04235).
    """
    _checks.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps1", eps1, 0.0)
    factoring = (factored_dims, min_dim_size_to_factor)
    check_factoring_args(*factoring)
    who = "scale_by_factored_second_moment"

    axes_of = functools.partial(
        factored_axes, factored_dims=factored_dims, min_dim_size_to_factor=min_dim_size_to_factor
    )

    _checks.check_bool("group_leaves", group_leaves)

    def init_fn(params):
        _checks.check_param_leaves(params, who)
        dims = _leaves.batch_dims_of(batch_dims, params, who)
        stats = dict(zip(STAT_FIELDS, init_second_moment(params, *factoring, dims), strict=True))
        stats = _leaves.init_fields(stats, params, dims, group_leaves, who)
        return FactoredSecondMomentState(jnp.zeros([], jnp.int32), **stats)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(g, axes, _, row, col, full):
            (correction,) = bias_corrections((b2,), count, _leaves.stat_dtype(g.dtype), debias)
            return second_moment(g, row, col, full, axes, b2, eps1, correction)

        outs, stats = _leaves.update_leaves(
            leaf, updates, state, STAT_FIELDS, axes_of, batch_dims, who
        )
        return outs, FactoredSecondMomentState(count, **stats)

    return optax.GradientTransformation(init_fn, update_fn)
