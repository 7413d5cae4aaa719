r"""CAME's three preconditioning stages as one transformation, computed jointly.

:func:`scale_by_came` has the values of the chain
``scale_by_factored_second_moment -> clip_by_block_rms -> scale_by_confidence``
and calls the same per-leaf functions, but hands them the clipped update as a
function of the gradient and two small vectors instead of an array: every
full-size consumer (the clip's mean square, the momentum, the two instability
reductions) recomputes it, so no parameter-sized intermediate is stored
between kernels; the consumers after the clip multiply by its divisor's
reciprocal themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from came_optax import _cautious, _checks, _confidence, _factored, _layout, _schedule

# The cautious mask's floor on the kept fraction (the authors' reference value).
CAUTIOUS_FLOOR = 1e-3


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


def clip_divisor(u_fn: Callable[[str], jax.Array], threshold: Any):
    r"""``optax.clip_by_block_rms``'s divisor :math:`\max(1, \operatorname{RMS}(u) / d)`."""
    rms = jnp.sqrt(_schedule.mean(_factored.abs_square(u_fn("clip")), None))
    return jnp.maximum(1.0, rms / threshold)


def _recomputed_update(g, r, c, axes, divisor=None) -> Callable[[str], jax.Array]:
    """The stage-1 output ``outer(g, r, c) / divisor``, recomputed by each consumer.

    Each full-size consumer multiplies by the scalar's reciprocal itself: a divided row
    vector would be one more small kernel on GPUs, and a division per element is slow on CPUs.
    """

    def u_fn(consumer: str) -> jax.Array:
        if divisor is None:
            g_, r_, c_ = _schedule.fresh((g, r, c), consumer)
            return _factored.outer(g_, r_, c_, axes)
        g_, r_, c_, s_ = _schedule.fresh((g, r, c, 1.0 / divisor), consumer)
        return _factored.outer(g_, r_, c_, axes) * s_

    return u_fn


def _leaf_step(g, mu, row, col, full, r_row, r_col, axes, hp, corrections):
    """One leaf of :func:`scale_by_came`: returns ``(out, m, stats...)``."""
    c2, c1, c3 = corrections
    clip = hp["clip_threshold"]

    def divisor(factors):
        return clip_divisor(lambda consumer: _factored.apply_factors(g, factors, None), clip)

    # An unfactored leaf's clip reduction is taken inside the overflow guard, beside its
    # finiteness check; a factored leaf's needs its own pass over g anyway.
    inside = divisor if axes is None and clip is not None else None
    factors, (row, col, full), div = _factored.second_moment_step(
        g, row, col, full, axes, hp["b2"], hp["eps1"], c2, inside
    )
    if axes is None:
        u = _factored.apply_factors(g, factors, None)
        if div is not None:
            u = u / div
        u_fn = lambda consumer: u
    else:
        u_fn = _recomputed_update(g, *factors, axes)
        if clip is not None:
            u_fn = _recomputed_update(g, *factors, axes, clip_divisor(u_fn, clip))
    out, m, r_row, r_col = _confidence.confidence_step(
        u_fn, mu, r_row, r_col, axes, hp["b1"], hp["b3"], hp["eps2"], (c1, c3)
    )
    if hp["cautious"]:
        out = out * _cautious.cautious_factor(out, g, CAUTIOUS_FLOOR)
    return out, m, row, col, full, r_row, r_col


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
    cautious: bool = False,
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
    output :math:`m_t`). The stages' math is shared with those transforms; this
    one recomputes the clipped update from the gradient wherever it is needed
    instead of storing it. :func:`came` chains it with weight decay and the
    learning rate.

    Its arguments (``b1``, ``b2``, ``b3``, ``eps1``, ``eps2``, ``clip_threshold``,
    ``mu_dtype``, ``debias``, ``factored_dims``, ``min_dim_size_to_factor``,
    ``cautious``) are those of :func:`came`. With ``cautious=True`` the output
    equals ``cautious(`` the chain of the three stages ``)``.

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
        dict(b1=b1, b2=b2, b3=b3, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold),
        mu_dtype,
        cautious=cautious,
        debias=debias,
        factored_dims=factored_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
        who="scale_by_came",
    )


def came_transformation(
    hp: dict[str, Any],
    mu_dtype: Any,
    *,
    cautious: bool,
    debias: bool,
    factored_dims: _factored.FactoredDims,
    min_dim_size_to_factor: int | None,
    who: str,
) -> optax.GradientTransformation:
    """:func:`scale_by_came`, validated, with errors attributed to ``who``."""
    _checks.check_range("b1", hp["b1"], 0.0, 1.0)
    for name in ("b2", "b3"):
        _checks.check_range(name, hp[name], 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps1", hp["eps1"], 0.0)
    _checks.check_range("eps2", hp["eps2"], 0.0)
    if hp["clip_threshold"] is not None:
        _checks.check_range("clip_threshold", hp["clip_threshold"], 0.0, low_inclusive=False)
    _factored.check_factoring_args(factored_dims, min_dim_size_to_factor)
    mu_dtype = _checks.resolve_dtype("mu_dtype", mu_dtype, _confidence.QUANTIZED)
    if not isinstance(cautious, bool):
        raise ValueError(f"cautious must be a Python bool decided at trace time; got {cautious!r}.")
    hp = dict(hp, cautious=cautious)

    def init_fn(params):
        _checks.check_param_leaves(params, who)
        mu, mu_scale = _confidence.init_momentum(params, mu_dtype, who)
        v_row, v_col, v = _factored.init_second_moment(
            params, factored_dims, min_dim_size_to_factor
        )
        r_row, r_col, _ = _factored.init_second_moment(
            params, factored_dims, min_dim_size_to_factor
        )
        return ScaleByCameState(
            jnp.zeros([], jnp.int32), mu, v_row, v_col, v, r_row, r_col, mu_scale
        )

    def update_fn(updates, state, params=None):
        del params
        paths, leaves, treedef = _checks.flatten_updates(updates, who)
        axes = _factored.leaf_axes(leaves, factored_dims, min_dim_size_to_factor)
        mus = _confidence.check_momentum(treedef, state.mu, who)
        scales = _layout.leaves_of(state.mu_scale, len(leaves), "mu_scale", who)
        fields = ("v_row", "v_col", "v", "r_row", "r_col")
        stats = [_layout.leaves_of(getattr(state, f), len(leaves), f, who) for f in fields]
        _checks.check_stat_shapes(paths, leaves, axes, stats[0], stats[2], who)
        count = optax.safe_increment(state.count)
        decays = (hp["b2"], hp["b1"], hp["b3"])
        results = []
        for g, mu, scale, *leaf_stats, a in zip(leaves, mus, scales, *stats, axes, strict=True):
            g = g.astype(_factored.compute_dtype(g.dtype))
            out, m, *new_stats = _leaf_step(
                g,
                _confidence.load_momentum(mu, scale, g.dtype),
                *leaf_stats,
                a,
                hp,
                _factored.bias_corrections(decays, count, _factored.stat_dtype(g.dtype), debias),
            )
            results.append((out, *_confidence.store_momentum(m, mu, scale), *new_stats))
        outs, new_mus, new_scales, *new_stats = _layout.unzip(results, 8)
        new_state = ScaleByCameState(
            count,
            jax.tree.unflatten(treedef, new_mus),
            *(_layout.like(getattr(state, f), s) for f, s in zip(fields, new_stats, strict=True)),
            _layout.like(state.mu_scale, new_scales),
        )
        return jax.tree.unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)
