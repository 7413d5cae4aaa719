r"""CAME's three preconditioning stages as one transformation.

:func:`scale_by_came` has the values of the chain
``scale_by_factored_second_moment -> clip_by_block_rms -> scale_by_confidence``
and calls the same per-leaf functions, with one count and one state.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from came_optax import _checks, _confidence, _factored, _leaves


class ScaleByCameState(NamedTuple):
    """State of :func:`scale_by_came`: one count and CAME's statistics.

    Every field but ``count`` is a tree with the parameters' structure, so
    ``optax.tree.get(state, 'mu')`` and ``optax.tree.map_params`` work on it.

    Attributes:
      count: number of updates applied so far (int32).
      mu: the momentum, with the parameters' structure (metadata boxes
        included), shapes and ``mu_dtype`` (with ``mu_dtype='int8'``, float32
        for leaves too small to quantize).
      v_row, v_col: the second moment's row and column EMAs where a leaf is
        factored, else one-element placeholders (see
        :class:`FactoredSecondMomentState`).
      v: the full second-moment EMA where a leaf is not factored, else a
        placeholder.
      r_row, r_col: the instability's row and column EMAs where a leaf is
        factored, else placeholders (see :class:`ConfidenceState`).
      mu_scale: the float32 block scales of an int8 momentum, else
        placeholders (see :class:`ConfidenceState`).
    """

    count: jax.Array
    mu: optax.Updates
    v_row: optax.Params
    v_col: optax.Params
    v: optax.Params
    r_row: optax.Params
    r_col: optax.Params
    mu_scale: optax.Params


FIELDS = {
    "mu": "param",
    "v_row": "row",
    "v_col": "col",
    "v": "full",
    "r_row": "row",
    "r_col": "col",
    "mu_scale": None,
}


def clip_by_rms(u: jax.Array, threshold: Any, batch_dims: int = 0) -> jax.Array:
    r"""One leaf of ``optax.clip_by_block_rms``: :math:`u / \max(1, \operatorname{RMS}(u) / d)`.

    With ``batch_dims``, each copy ``u[i, ...]`` along the leading axes is clipped on its own.
    """
    copy_axes = tuple(range(batch_dims, u.ndim))
    rms = jnp.sqrt(jnp.mean(_factored.abs_square(u), axis=copy_axes, keepdims=True))
    return u / jnp.maximum(1.0, rms / threshold)


def scale_by_came(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.9999,
    eps1: float | jax.Array = 1e-30,
    eps2: float | jax.Array = 1e-16,
    clip_threshold: float | jax.Array | None = 1.0,
    mu_dtype: Any | None = None,
    *,
    debias: bool = False,
    factored_dims: _factored.FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
    batch_dims: Any = None,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    r"""CAME's preconditioner: factored second moment, RMS clip, confidence-scaled momentum.

    The values of ``optax.chain(scale_by_factored_second_moment(b2, eps1),
    optax.clip_by_block_rms(clip_threshold), scale_by_confidence(b1, b3,
    eps2))`` (Luo et al., 2023, Algorithm 1, lines 3-11), with one count and the
    statistics in one :class:`ScaleByCameState`. Per leaf with gradient
    :math:`g`:

    .. math::

      u_t &= \frac{g}{\sqrt{V_t}} \Big/
        \max\!\Big(1, \frac{\operatorname{RMS}(g / \sqrt{V_t})}{d}\Big), \qquad
      m_t = \beta_1 m_{t-1} + (1-\beta_1)\, u_t, \\
      \text{out} &= m_t / \sqrt{S_t}

    with :math:`V_t` the factored EMA of :math:`|g|^2 + \epsilon_1` and
    :math:`S_t` that of :math:`|u_t - m_t|^2 + \epsilon_2` (unfactored leaves
    output :math:`m_t`). Each stage's per-leaf math is the function those
    transforms call; here they run leaf by leaf in one transformation, so XLA
    sees each leaf's whole step at once. :func:`came` chains it with weight
    decay and the learning rate.

    Its arguments (``b1``, ``b2``, ``b3``, ``eps1``, ``eps2``, ``clip_threshold``,
    ``mu_dtype``, ``debias``, ``factored_dims``, ``min_dim_size_to_factor``,
    ``batch_dims``, ``group_leaves``) are those of :func:`came`;
    ``came(cautious=True)`` wraps this transformation in :func:`cautious`.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`ScaleByCameState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import scale_by_came
      >>> tx = optax.chain(scale_by_came(), optax.scale_by_learning_rate(1e-3))
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> updates, state = tx.update(params, tx.init(params))
      >>> optax.tree.get(state, 'count'), state[0].v_row['w'].shape
      (Array(1, dtype=int32), (4,))

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
      Optimization, ACL 2023 (arXiv:2307.02047).
    """
    return came_transformation(
        b1,
        b2,
        b3,
        eps1,
        eps2,
        clip_threshold,
        mu_dtype,
        debias,
        factored_dims,
        min_dim_size_to_factor,
        batch_dims,
        group_leaves,
        who="scale_by_came",
    )


def came_transformation(
    b1,
    b2,
    b3,
    eps1,
    eps2,
    clip_threshold,
    mu_dtype,
    debias,
    factored_dims,
    min_dim_size_to_factor,
    batch_dims,
    group_leaves,
    *,
    who: str,
) -> optax.GradientTransformation:
    """:func:`scale_by_came`, validated, with errors attributed to ``who``."""
    _checks.check_range("b1", b1, 0.0, 1.0)
    for name, value in (("b2", b2), ("b3", b3)):
        _checks.check_range(name, value, 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps1", eps1, 0.0)
    _checks.check_range("eps2", eps2, 0.0)
    if clip_threshold is not None:
        _checks.check_range("clip_threshold", clip_threshold, 0.0, low_inclusive=False)
    factoring = (factored_dims, min_dim_size_to_factor)
    _factored.check_factoring_args(*factoring)
    mu_dtype = _checks.resolve_dtype("mu_dtype", mu_dtype, _confidence.QUANTIZED)
    _checks.check_bool("group_leaves", group_leaves)
    axes_of = functools.partial(
        _factored.factored_axes,
        factored_dims=factored_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
    )

    def init_fn(params):
        _checks.check_param_leaves(params, who)
        dims = _leaves.batch_dims_of(batch_dims, params, who)
        mu, mu_scale = _confidence.init_momentum(params, mu_dtype, who, dims)
        v_row, v_col, v = _factored.init_second_moment(params, *factoring, dims)
        r_row, r_col, _ = _factored.init_second_moment(params, *factoring, dims)
        fields = dict(mu=mu, v_row=v_row, v_col=v_col, v=v, r_row=r_row, r_col=r_col)
        fields = _leaves.init_fields(
            fields | {"mu_scale": mu_scale}, params, dims, group_leaves, who
        )
        return ScaleByCameState(jnp.zeros([], jnp.int32), **fields)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(g, axes, copies, mu, v_row, v_col, v, r_row, r_col, scale):
            c2, c1, c3 = _factored.bias_corrections(
                (b2, b1, b3), count, _leaves.stat_dtype(g.dtype), debias
            )
            u, v_row, v_col, v = _factored.second_moment(g, v_row, v_col, v, axes, b2, eps1, c2)
            if clip_threshold is not None:
                u = clip_by_rms(u, clip_threshold, copies)
            m = _confidence.load_momentum(mu, scale, g.dtype)
            out, m, r_row, r_col = _confidence.confidence(
                u, m, r_row, r_col, axes, b1, b3, eps2, (c1, c3)
            )
            mu, scale = _confidence.store_momentum(m, mu, scale)
            return out, mu, v_row, v_col, v, r_row, r_col, scale

        outs, fields = _leaves.update_leaves(leaf, updates, state, FIELDS, axes_of, batch_dims, who)
        return outs, ScaleByCameState(count, **fields)

    return optax.GradientTransformation(init_fn, update_fn)
