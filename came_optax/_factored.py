r"""Factored second moment: CAME's first stage, and the factored EMA it shares.

A matrix-shaped statistic ``X`` (:math:`|g|^2` here, the instability in
:mod:`came_optax._confidence`) is tracked by two exponential moving averages of
its means, one per kept axis, instead of a full copy. Its reconstruction

.. math::

  \hat X_{ij} = \frac{R_i\, C_j}{\operatorname{mean}_k R_k}

is never materialised: callers multiply by the row and column vectors of
:func:`inverse_root_vectors`. The per-leaf functions here are the only
statement of this math; :func:`scale_by_factored_second_moment` and
:func:`came_optax.scale_by_came` both call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # removed in jax 0.11
    from jax.experimental.shard_alike import shard_alike
except ImportError:  # pragma: no cover - depends on the installed jax
    shard_alike = None

from came_optax import _checks, _layout, _schedule

FactoredDims = Literal["last_two", "largest_two"]
Axes = tuple[int, int] | None

# A leaf whose squared gradient overflows is scaled by 2**OVERFLOW_EXPONENT: the
# mean of squares of any finite float32 array of up to 2**31 entries then fits.
OVERFLOW_EXPONENT = -80


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


def factored_axes(
    shape: tuple[int, ...],
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
) -> Axes:
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

    References:
      Shazeer & Stern, Adafactor, ICML 2018 (arXiv:1804.04235), section 3.
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
    """The dtype updates are computed in: float32 or complex64, or their 64-bit forms."""
    return jnp.promote_types(dtype, jnp.float32)


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype statistics are kept in (float32, or float64 for 64-bit leaves)."""
    return jnp.finfo(compute_dtype(dtype)).dtype


def abs_square(x: jax.Array) -> jax.Array:
    """:math:`|x|^2`, real for complex ``x``."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def zeros_like_param(leaf: Any, dtype: Any) -> jax.Array:
    """Zeros of ``leaf``'s shape in ``dtype``, sharded like ``leaf`` even under ``jax.jit``.

    Inside ``jax.jit`` with auto axis types a constant is tied to no input, so the
    partitioner would replicate it; ``shard_alike`` ties it to the parameter (jax < 0.11;
    later versions have no ``shard_alike``, so pass ``out_shardings``, for example from
    :func:`came_optax.state_shardings`, when jitting ``init``). Concrete
    arrays and explicit axis types carry their sharding already. Inside ``shard_map``
    with manual axes each device holds its own block, so there is nothing to tie.
    """
    zeros = jnp.zeros_like(leaf, dtype=dtype)
    if (
        shard_alike is not None
        and isinstance(leaf, jax.core.Tracer)
        and not jax.sharding.get_abstract_mesh().manual_axes
    ):
        zeros = shard_alike(leaf, zeros)[1]
    return zeros


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


def init_stats(leaf: Any, axes: Axes) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero ``(row, col, full)`` statistics for one leaf, placeholders where unused.

    Row and column statistics are reductions of parameter-shaped zeros, so they are
    sharded like the parameter with the reduced axis removed.
    """
    dtype = stat_dtype(jnp.result_type(leaf))
    if axes is None:
        return _layout.placeholder(dtype), _layout.placeholder(dtype), zeros_like_param(leaf, dtype)
    if not isinstance(leaf, jax.core.Tracer):
        # Compiled, the parameter-shaped zeros are folded away instead of allocated.
        return _init_factored_compiled(leaf, axes)
    return _init_factored(leaf, axes)


def _init_factored(leaf: Any, axes: tuple[int, int]) -> tuple[jax.Array, ...]:
    dtype = stat_dtype(jnp.result_type(leaf))
    zeros = zeros_like_param(leaf, dtype)
    row_axis, col_axis = axes
    return jnp.sum(zeros, axis=col_axis), jnp.sum(zeros, axis=row_axis), _layout.placeholder(dtype)


_init_factored_compiled = jax.jit(_init_factored, static_argnums=1)


def ema(old: jax.Array, new: jax.Array, decay: Any) -> jax.Array:
    """One exponential-moving-average step."""
    return decay * old + (1.0 - decay) * new


def inverse_root_vectors(
    row: jax.Array, col: jax.Array, axes: tuple[int, int], correction: Any = None
) -> tuple[jax.Array, jax.Array]:
    r"""Row and column vectors whose outer product is :math:`(\hat X / c)^{-1/2}`.

    The mean of the rows divides the column vector, :math:`R^{-1/2}` and
    :math:`(C / (c \operatorname{mean} R))^{-1/2}`, so the row vector is
    elementwise in ``row`` and compiles into the kernel that produced it.
    """
    # The mean lacks both factored axes; the column statistic lacks only the row axis, so the
    # column axis goes back at its position there, axes[1] - 1.
    mean = jnp.expand_dims(jnp.mean(row, axis=axes[0]), axes[1] - 1)
    normalised = col / mean
    if correction is not None:
        normalised = normalised / correction
    return jax.lax.rsqrt(row), jax.lax.rsqrt(normalised)


def outer(x: jax.Array, r: jax.Array, c: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """``x`` times the outer product of a row vector ``r`` and a column vector ``c``."""
    row_axis, col_axis = axes
    return (jnp.expand_dims(r, col_axis) * jnp.expand_dims(c, row_axis)) * x


def factored_means(x: jax.Array, axes: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Row and column means of a full-size ``x``, each consumer with its own inputs."""
    row_axis, col_axis = axes
    return _schedule.mean(x, col_axis), _schedule.mean(x, row_axis)


def second_moment_means(
    g: jax.Array, axes: Axes, eps1: Any, then: Callable[..., Any] | None = None
) -> Any:
    r"""This step's means of :math:`|s g|^2 + \epsilon_1` and the scale :math:`s`.

    ``s`` is 1 unless the mean of this step's row means (of all of them for an
    unfactored leaf) is not finite: some :math:`|g|` above about 1.8e19, or a sum
    of squares beyond float32's range. Then :math:`s = 2^{-80}` and, for a
    factored leaf, only the row means are recomputed; the column means are set to
    the mean of the row means, so that
    this step's estimate is the row statistic alone (a second pass over the columns
    would cost every step on accelerators, where the rescaled means are computed
    together with the plain ones). CAME's update does not depend on the gradient's
    scale except through :math:`\epsilon_1` and the EMA history, so this keeps
    training finite where came-pytorch produces NaN. Non-finite gradients pass
    through.

    Returns ``(s, means)``, or ``then(s, means)`` when ``then`` is given: what
    ``then`` computes falls on the same side of the overflow guard, so on TPUs
    and GPUs both candidates' results are computed and one is selected at the
    end (for an unfactored leaf the clip's reduction then shares the finiteness
    check's pass instead of waiting for it).
    """
    if then is None:
        then = lambda scale, means: (scale, means)  # noqa: E731
    if axes is None:
        plain = (abs_square(g) + eps1,)
    else:
        row_axis, col_axis = axes
        plain = (
            # The first reduction reads g as it is, the second its own copy (see _schedule).
            _schedule.mean(abs_square(g), col_axis) + eps1,
            _schedule.mean(abs_square(_schedule.fresh(g, "v_col")), row_axis) + eps1,
        )
    # The squares are non-negative, so finite row means with a finite mean leave every column
    # sum finite too: one check serves both.
    finite = jnp.isfinite(jnp.mean(plain[0]))
    one = jnp.ones((), g.real.dtype)
    # Behind a barrier, or XLA rewrites (g * s)**2 as g**2 * s**2, where s**2 underflows.
    rescale = jax.lax.optimization_barrier(jnp.asarray(2.0**OVERFLOW_EXPONENT, g.real.dtype))

    def rescaled() -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if axes is None:
            return rescale, (abs_square(g * rescale) + eps1,)
        rows = _schedule.mean(abs_square(g * rescale), col_axis) + eps1
        cols = jnp.expand_dims(jnp.mean(rows, axis=row_axis), col_axis - 1)
        # A product with ones shaped (and, with explicit axes, sharded) like the plain means.
        return rescale, (rows, jnp.ones_like(plain[1]) * cols)

    return _schedule.overflow_guard(finite, lambda: then(one, plain), lambda: then(*rescaled()))


def second_moment_step(
    g: jax.Array,
    row: jax.Array,
    col: jax.Array,
    full: jax.Array,
    axes: Axes,
    b2: Any,
    eps1: Any,
    correction: Any,
    then: Callable[[tuple[jax.Array, ...]], Any] | None = None,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, jax.Array, jax.Array], Any]:
    """Folds one gradient into a leaf's second moment.

    Returns ``(factors, (row, col, full), extra)``: the new statistics, and the
    inverse-root factors, with the overflow scale folded in, such that the
    stage's output is ``g * factors[0]`` (unfactored) or
    ``outer(g, *factors, axes)`` (factored); ``extra`` is ``then(factors)``,
    computed on the same side of the overflow guard (see
    :func:`second_moment_means`), or None.
    """

    def fold(scale, means):
        if axes is None:
            new_full = ema(full, means[0], b2)
            v_hat = new_full if correction is None else new_full / correction
            factors, stats = (jax.lax.rsqrt(v_hat) * scale,), (row, col, new_full)
        else:
            new_row, new_col = ema(row, means[0], b2), ema(col, means[1], b2)
            r, c = inverse_root_vectors(new_row, new_col, axes, correction)
            factors, stats = (r * scale, c), (new_row, new_col, full)
        return factors, stats, None if then is None else then(factors)

    if then is None:
        # Selecting the means, not everything computed from them, keeps the row and
        # column vectors' arithmetic in one copy.
        return fold(*second_moment_means(g, axes, eps1))
    return second_moment_means(g, axes, eps1, fold)


def apply_factors(g: jax.Array, factors: tuple[jax.Array, ...], axes: Axes) -> jax.Array:
    """The stage's output from :func:`second_moment_step`'s factors."""
    if axes is None:
        return factors[0] * g
    return outer(g, *factors, axes)


def leaf_axes(leaves: list[Any], factored_dims: FactoredDims, min_dim: int | None) -> list[Axes]:
    """:func:`factored_axes` of each leaf."""
    return [factored_axes(jnp.shape(x), factored_dims, min_dim) for x in leaves]


def init_second_moment(params: Any, factored_dims: FactoredDims, min_dim: int | None):
    """``(v_row, v_col, v)`` trees of zeros for ``params`` (see the state's docstring)."""

    def init(x):
        return init_stats(x, factored_axes(jnp.shape(x), factored_dims, min_dim))

    return tuple(_layout.unboxed(lambda x, i=i: init(x)[i], params) for i in range(3))


def scale_by_factored_second_moment(
    b2: float | jax.Array = 0.999,
    eps1: float | jax.Array = 1e-30,
    *,
    debias: bool = False,
    factored_dims: FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
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

    A leaf whose :math:`|g|^2` overflows float32 (some :math:`|g|` above about
    1.8e19) is first multiplied by :math:`2^{-80}`, and that step's column means
    are replaced by the mean of its row means, where came-pytorch would produce
    NaN; below that nothing changes.

    Args:
      b2: decay of the second-moment EMAs, in [0, 1). May be scheduled or
        injected.
      eps1: added to :math:`|g|^2` before averaging, >= 0.
      debias: divide the estimate by :math:`1-\beta_2^t`. Off in the reference.
      factored_dims: which axes to factor; see :func:`factored_axes`.
      min_dim_size_to_factor: minimum size of both factored axes; None (the
        reference) factors every leaf of rank >= 2.

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
    check_factoring_args(factored_dims, min_dim_size_to_factor)
    who = "scale_by_factored_second_moment"

    def init_fn(params):
        _checks.check_param_leaves(params, who)
        v_row, v_col, v = init_second_moment(params, factored_dims, min_dim_size_to_factor)
        return FactoredSecondMomentState(jnp.zeros([], jnp.int32), v_row, v_col, v)

    def update_fn(updates, state, params=None):
        del params
        paths, leaves, treedef = _checks.flatten_updates(updates, who)
        axes = leaf_axes(leaves, factored_dims, min_dim_size_to_factor)
        rows, cols, fulls = (
            _layout.leaves_of(tree, len(leaves), name, who)
            for tree, name in ((state.v_row, "v_row"), (state.v_col, "v_col"), (state.v, "v"))
        )
        _checks.check_stat_shapes(paths, leaves, axes, rows, fulls, who)
        count = optax.safe_increment(state.count)

        outs, stats = [], []
        for g, row, col, full, a in zip(leaves, rows, cols, fulls, axes, strict=True):
            g = g.astype(compute_dtype(g.dtype))
            (correction,) = bias_corrections((b2,), count, stat_dtype(g.dtype), debias)
            factors, new, _ = second_moment_step(g, row, col, full, a, b2, eps1, correction)
            outs.append(apply_factors(g, factors, a))
            stats.append(new)
        new_rows, new_cols, new_fulls = _layout.unzip(stats, 3)
        new_state = FactoredSecondMomentState(
            count,
            _layout.like(state.v_row, new_rows),
            _layout.like(state.v_col, new_cols),
            _layout.like(state.v, new_fulls),
        )
        return jax.tree.unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)
