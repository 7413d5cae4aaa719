"""Confidence-guided momentum: CAME's second and third stages.

The instability ``(u_t - m_t)**2`` needs both the incoming (preconditioned and
clipped) update ``u_t`` and the new momentum ``m_t``, so one transformation owns
the momentum and the instability statistics together. Placed after any
preconditioner it turns that preconditioner's output into momentum scaled by
its confidence; with ``b1 = 0`` it reduces to plain momentum-free scaling by
the inverse root of the instability.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from came_optax import _checks, _factored, _leaves, _quantize

# The integer momentum dtypes: int8 is stored blockwise quantized (see _quantize).
QUANTIZED = ("int8",)


class ConfidenceState(NamedTuple):
    """State of :func:`scale_by_confidence`.

    Attributes:
      count: number of updates applied so far (int32).
      mu: the momentum, with the parameters' tree structure (metadata boxes
        included), shapes and ``mu_dtype`` (with ``mu_dtype='int8'``, float32
        for leaves too small to quantize).
      r_row: per leaf, the EMA of row means of the instability where the leaf
        is factored, else a one-element placeholder; the parameters' structure
        without metadata boxes.
      r_col: per leaf, the EMA of column means of the instability, or a
        placeholder.
      mu_scale: per leaf with an int8 momentum, its float32 block scales (the
        parameter's shape with the blocked axes divided by the block's sides;
        see :func:`scale_by_confidence`), else a placeholder.
    """

    count: jax.Array
    mu: optax.Updates
    r_row: optax.Params
    r_col: optax.Params
    mu_scale: optax.Params


def confidence(
    u: jax.Array,
    mu: jax.Array,
    r_row: jax.Array,
    r_col: jax.Array,
    axes: _factored.Axes,
    b1: Any,
    b3: Any,
    eps2: Any,
    corrections: tuple[Any, Any],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One leaf of the stage: returns ``(out, m, r_row, r_col)``.

    ``mu`` is in the compute dtype; ``corrections`` are the momentum's and the
    instability's bias corrections, or None.
    """
    c1, c3 = corrections
    m = _factored.ema(mu, u, b1)
    m_hat = m if c1 is None else m / c1
    if axes is None:
        return m_hat, m, r_row, r_col
    r_row, r_col = _factored.factored_ema(_factored.abs_square(u - m), r_row, r_col, axes, b3, eps2)
    s_row, s_col = _factored.inverse_root_vectors(r_row, r_col, axes, c3)
    return _factored.outer(m_hat, s_row, s_col, axes), m, r_row, r_col


def momentum_dtype(param: Any, mu_dtype: Any, path: Any, who: str, batch_dims: int) -> jnp.dtype:
    """The stored momentum's dtype for a parameter with ``batch_dims`` batch axes, validated."""
    param_dtype = jnp.result_type(param)
    if mu_dtype is None:
        return _leaves.compute_dtype(param_dtype)
    if jnp.issubdtype(mu_dtype, jnp.complexfloating) and not jnp.issubdtype(
        param_dtype, jnp.complexfloating
    ):
        raise ValueError(
            f"{who}: mu_dtype={jnp.dtype(mu_dtype).name} is complex but "
            f"{_checks.leaf_name(path)} is real ({jnp.dtype(param_dtype).name})."
        )
    if jnp.issubdtype(param_dtype, jnp.complexfloating) and not jnp.issubdtype(
        mu_dtype, jnp.complexfloating
    ):
        raise ValueError(
            f"{who}: mu_dtype={jnp.dtype(mu_dtype).name} cannot hold the complex momentum of "
            f"{_checks.leaf_name(path)} ({jnp.dtype(param_dtype).name}); use mu_dtype=None or "
            "optax.partition to give complex leaves their own optimizer."
        )
    if mu_dtype.name in QUANTIZED and _quantize.block_shape(jnp.shape(param), batch_dims) is None:
        return _leaves.compute_dtype(param_dtype)
    return jnp.dtype(mu_dtype)


def init_momentum(params: Any, mu_dtype: Any, who: str, dims: list[int]) -> tuple[Any, Any]:
    """Zero momentum in the parameters' structure, sharded like each parameter, and its scales.

    ``dims`` holds each leaf's batch axes. The scales (the second tree, without metadata
    boxes) are zeros where the momentum is int8 and placeholders elsewhere.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mu = _leaves.like(
        params,
        [
            _factored.zeros_like_param(p, momentum_dtype(p, mu_dtype, path, who, b))
            for (path, p), b in zip(flat, dims, strict=True)
        ],
    )

    def scales(p, b):
        block = _quantize.block_shape(jnp.shape(p), b)
        if mu_dtype is None or mu_dtype.name not in QUANTIZED or block is None:
            return _leaves.placeholder()
        return _quantize.zero_scales(_factored.zeros_like_param(p, jnp.float32), block)

    return mu, _leaves.unzip_tree(lambda p, b: (scales(p, b),), params, 1, dims)[0]


def load_momentum(mu: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """The stored momentum in the compute ``dtype`` (dequantized if it is int8)."""
    if mu.dtype != jnp.int8:
        return mu.astype(dtype)
    return _quantize.dequantize(mu, scale, _quantize.block_of(mu.shape, scale.shape), dtype)


def store_momentum(m: jax.Array, mu: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The new momentum ``m`` in the stored momentum's dtype (and blocks), and its scales."""
    if mu.dtype != jnp.int8:
        return m.astype(mu.dtype), scale
    return _quantize.quantize(m, _quantize.block_of(mu.shape, scale.shape))


FIELDS = {"mu": "param", "mu_scale": None, "r_row": "row", "r_col": "col"}


def scale_by_confidence(
    b1: float | jax.Array = 0.9,
    b3: float | jax.Array = 0.9999,
    eps2: float | jax.Array = 1e-16,
    *,
    mu_dtype: Any | None = None,
    debias: bool = False,
    factored_dims: _factored.FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
    batch_dims: Any = None,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    r"""Momentum scaled by the inverse root of a factored instability estimate.

    CAME's confidence-guided strategy (Luo et al., 2023, Algorithm 1, lines
    7-11). For an incoming update :math:`u_t` (in CAME, the clipped output of
    :func:`scale_by_factored_second_moment`):

    .. math::

      m_t = \beta_1 m_{t-1} + (1-\beta_1)\, u_t

    and, for factored leaves (same rule as :func:`scale_by_factored_second_moment`),
    with the instability :math:`r_t = |u_t - m_t|^2 + \epsilon_2`:

    .. math::

      R_t = \beta_3 R_{t-1} + (1-\beta_3)\operatorname{mean}_{\text{col}}(r_t),\quad
      C_t = \beta_3 C_{t-1} + (1-\beta_3)\operatorname{mean}_{\text{row}}(r_t),\quad
      S_t = \frac{R_t C_t^\top}{\operatorname{mean}(R_t)},\quad
      \text{out} = \frac{m_t}{\sqrt{S_t}}.

    Unfactored leaves (scalars and vectors by default) output :math:`m_t`, as
    came-pytorch does. Arithmetic is float32 (complex64 for complex inputs;
    64-bit for 64-bit inputs); the momentum is stored in ``mu_dtype``.

    With ``debias=True`` (an option beyond the paper and came-pytorch) the
    output is :math:`\hat m_t / \sqrt{S_t / (1-\beta_3^t)}` with
    :math:`\hat m_t = m_t / (1-\beta_1^t)` (just :math:`\hat m_t` for unfactored
    leaves). The instability keeps the raw :math:`m_t`: with :math:`\hat m_t`
    in its place the first instability would be exactly zero (:math:`\hat m_1 =
    u_1`) and the first update :math:`u_1/\sqrt{\epsilon_2}`, about
    :math:`10^8` times too large.

    With ``mu_dtype='int8'`` (beyond the paper) the momentum of every leaf of
    at least 4096 elements is stored blockwise quantized: blocks of 256
    elements (16x16 tiles over the last two axes where they divide them),
    each as int8 :math:`\operatorname{round}(m / s)` with one float32 scale
    :math:`s = \max|m| / 127` in ``mu_scale``. A step dequantizes
    :math:`m_{t-1}`, computes :math:`m_t`, the instability and the output in
    float32 from the unquantized :math:`m_t`, and stores :math:`m_t`
    quantized (see ``came_optax/_quantize.py`` for the block rule and why a
    block never straddles a shard). Smaller leaves keep a float32 momentum.

    Args:
      b1: momentum decay, in [0, 1]. May be scheduled or injected.
      b3: decay of the instability EMAs, in [0, 1).
      eps2: added to the instability, >= 0.
      mu_dtype: dtype of the stored momentum (e.g. ``jnp.bfloat16`` to halve
        its memory, ``'int8'`` or ``jnp.int8`` to quarter it). None keeps the
        compute dtype (float32 or complex64).
      debias: bias-correct the momentum and the instability; off in the
        reference.
      factored_dims: which axes to factor; see :func:`factored_axes`.
      min_dim_size_to_factor: minimum size of both factored axes; None (the
        reference) factors every leaf of rank >= 2.
      batch_dims: leading axes of each leaf that hold independent copies (see
        :func:`came_optax.came`): never factored, and int8 blocks span one copy.
      group_leaves: keep the statistics stacked per group of same-shaped leaves
        and update each group at once (see :func:`came_optax.came`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`ConfidenceState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import scale_by_confidence, scale_by_factored_second_moment
      >>> tx = optax.chain(scale_by_factored_second_moment(), optax.clip_by_block_rms(1.0),
      ...                  scale_by_confidence(), optax.scale(-1e-3))
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> updates, state = tx.update(params, tx.init(params))
      >>> state[2].r_row['w'].shape, state[2].mu['b'].shape
      ((4,), (3,))

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
      Optimization, ACL 2023 (arXiv:2307.02047).
    """
    _checks.check_range("b1", b1, 0.0, 1.0)
    _checks.check_range("b3", b3, 0.0, 1.0, high_inclusive=False)
    _checks.check_range("eps2", eps2, 0.0)
    _factored.check_factoring_args(factored_dims, min_dim_size_to_factor)
    mu_dtype = _checks.resolve_dtype("mu_dtype", mu_dtype, QUANTIZED)
    axes_of = functools.partial(
        _factored.factored_axes,
        factored_dims=factored_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
    )
    who = "scale_by_confidence"

    _checks.check_bool("group_leaves", group_leaves)

    def init_fn(params):
        _checks.check_param_leaves(params, who)
        dims = _leaves.batch_dims_of(batch_dims, params, who)
        mu, mu_scale = init_momentum(params, mu_dtype, who, dims)
        stats = _factored.init_second_moment(params, factored_dims, min_dim_size_to_factor, dims)
        fields = {"mu": mu, "r_row": stats[0], "r_col": stats[1], "mu_scale": mu_scale}
        fields = _leaves.init_fields(fields, params, dims, group_leaves, who)
        return ConfidenceState(jnp.zeros([], jnp.int32), **fields)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(u, axes, _, mu, scale, row, col):
            decays = (b1, b3)
            corrections = _factored.bias_corrections(
                decays, count, _leaves.stat_dtype(u.dtype), debias
            )
            m = load_momentum(mu, scale, u.dtype)
            out, m, row, col = confidence(u, m, row, col, axes, b1, b3, eps2, corrections)
            return (out, *store_momentum(m, mu, scale), row, col)

        outs, fields = _leaves.update_leaves(leaf, updates, state, FIELDS, axes_of, batch_dims, who)
        return outs, ConfidenceState(count, **fields)

    return optax.GradientTransformation(init_fn, update_fn)
