"""Confidence-guided momentum: CAME's second and third stages.

The instability ``(u_t - m_t)**2`` needs both the incoming (preconditioned and
clipped) update ``u_t`` and the new momentum ``m_t``, so one transformation owns
the momentum and the instability statistics together. Placed after any
preconditioner it turns that preconditioner's output into momentum scaled by
its confidence; with ``b1 = 0`` it reduces to plain momentum-free scaling by
the inverse root of the instability.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from came_optax import _checks, _factored


class ConfidenceState(NamedTuple):
    """State of :func:`scale_by_confidence`.

    Attributes:
      count: number of updates applied so far (int32).
      mu: the momentum, with the parameters' tree structure, shapes and
        ``mu_dtype``.
      r_row: per leaf (``jax.tree.leaves`` order), the EMA of row means of the
        instability, or None where the leaf is not factored.
      r_col: per leaf, the EMA of column means of the instability, or None.
    """

    count: jax.Array
    mu: optax.Updates
    r_row: tuple[jax.Array | None, ...]
    r_col: tuple[jax.Array | None, ...]


def check_updates(treedef, leaves: list, axes: list, state: ConfidenceState) -> None:
    """Raises ValueError when updates do not match the tree the state was built for."""
    mu_treedef = jax.tree.structure(state.mu)
    if treedef != mu_treedef:
        raise ValueError(
            "scale_by_confidence: the updates' tree structure does not match the optimizer "
            f"state's momentum.\n  updates: {treedef}\n  state:   {mu_treedef}\nPass updates "
            "with the same tree structure as the parameters given to init."
        )
    mus = treedef.flatten_up_to(state.mu)
    _factored.check_leaves(leaves, axes, state.r_row, mus, "scale_by_confidence")


def scale_by_confidence(
    b1: float | jax.Array = 0.9,
    b3: float | jax.Array = 0.9999,
    eps2: float | jax.Array = 1e-16,
    *,
    mu_dtype: Any | None = None,
    debias: bool = False,
    factored_dims: _factored.FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformation:
    r"""Momentum scaled by the inverse root of a factored instability estimate.

    CAME's confidence-guided strategy (Luo et al., 2023, Algorithm 1, lines
    7-11). For an incoming update :math:`u_t` (in CAME, the clipped output of
    :func:`scale_by_factored_rms`):

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1)\, u_t

    and, for factored leaves (same rule as :func:`scale_by_factored_rms`), with
    the instability :math:`r_t = (u_t - m_t)^2 + \epsilon_2`:

    .. math::

      R_t = \beta_3 R_{t-1} + (1-\beta_3)\operatorname{mean}_{\text{col}}(r_t),\quad
      C_t = \beta_3 C_{t-1} + (1-\beta_3)\operatorname{mean}_{\text{row}}(r_t),\quad
      S_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)},\quad
      \text{out} = \frac{m_t}{\sqrt{S_t}}.

    Unfactored leaves (scalars and vectors by default) output :math:`m_t`, as
    came-pytorch does. Arithmetic is float32 (float64 for float64 inputs); the
    momentum is stored in ``mu_dtype``.

    With ``debias=True`` (an option beyond the paper and came-pytorch) the
    output is :math:`\hat m_t / \sqrt{S_t / (1-\beta_3^t)}` with
    :math:`\hat m_t = m_t / (1-\beta_1^t)` (just :math:`\hat m_t` for unfactored
    leaves). The instability keeps the raw :math:`m_t`: with :math:`\hat m_t`
    in its place the first instability would be exactly zero (:math:`\hat m_1 =
    u_1`) and the first update :math:`u_1/\sqrt{\epsilon_2}`, about
    :math:`10^8` times too large.

    Args:
      b1: momentum decay, in [0, 1]. May be scheduled or injected.
      b3: decay of the instability EMAs, in [0, 1).
      eps2: added to the instability, >= 0.
      mu_dtype: dtype of the stored momentum (e.g. ``jnp.bfloat16`` to halve
        its memory). None keeps float32 (float64 for float64 leaves).
      debias: bias-correct the momentum and the instability; off in the
        reference.
      factored_dims: which axes to factor; see :func:`factored_axes`.
      min_dim_size_to_factor: minimum size of both factored axes; None (the
        reference) factors every leaf of rank >= 2.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`ConfidenceState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import scale_by_confidence, scale_by_factored_rms
      >>> tx = optax.chain(scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
      ...                  scale_by_confidence(), optax.scale(-1e-3))
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> updates, state = tx.update(params, tx.init(params))

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
      Optimization, ACL 2023 (arXiv:2307.02047).
    """
    _checks.check_range("b1", b1, 0.0, 1.0)
    _checks.check_range("b3", b3, 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps2", eps2, 0.0)
    _factored.check_factoring_args(factored_dims, min_dim_size_to_factor)
    mu_dtype = _checks.resolve_dtype("mu_dtype", mu_dtype)

    def leaf_axes(leaves):
        return [
            _factored.factored_axes(jnp.shape(x), factored_dims, min_dim_size_to_factor)
            for x in leaves
        ]

    def momentum_dtype(dtype):
        return mu_dtype if mu_dtype is not None else _factored.compute_dtype(dtype)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        _checks.check_float_leaves(leaves, "parameters")
        mu = jax.tree.map(
            lambda p: _factored.zeros_like_param(p, momentum_dtype(jnp.result_type(p))), params
        )
        moments = [
            _factored.init_moments(x, a) for x, a in zip(leaves, leaf_axes(leaves), strict=True)
        ]
        rows = tuple(m[0] for m in moments)
        cols = tuple(m[1] for m in moments)
        return ConfidenceState(jnp.zeros([], jnp.int32), mu, rows, cols)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        axes = leaf_axes(leaves)
        check_updates(treedef, leaves, axes, state)
        count = optax.safe_increment(state.count)
        if debias:
            mu_correction = _factored.bias_correction(b1, count)
            r_correction = _factored.bias_correction(b3, count)
        else:
            mu_correction = r_correction = None
        outs, new_mus, rows, cols = [], [], [], []
        mus = treedef.flatten_up_to(state.mu)
        for u, mu, row, col, a in zip(leaves, mus, state.r_row, state.r_col, axes, strict=True):
            cdt = _factored.compute_dtype(u.dtype)
            u = u.astype(cdt)
            m = b1 * mu.astype(cdt) + (1.0 - b1) * u
            m_hat = m if mu_correction is None else m / mu_correction
            if a is None:
                out = m_hat
            else:
                r = jnp.square(u - m) + eps2
                row, col, _ = _factored.ema_moments(
                    _factored.moment_means(r, a), row, col, None, a, b3
                )
                out = _factored.scale_with(
                    m_hat, _factored.rsqrt_factors(row, col, None, a, r_correction)
                )
            outs.append(out)
            new_mus.append(m.astype(mu.dtype))
            rows.append(row)
            cols.append(col)
        new_state = ConfidenceState(
            count, jax.tree.unflatten(treedef, new_mus), tuple(rows), tuple(cols)
        )
        return jax.tree.unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)
