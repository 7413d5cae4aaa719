"""The ``came`` optimizer: CAME's stages chained like ``optax.adamw``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from came_optax import _checks, _confidence, _factored, _fused
from came_optax._confidence import scale_by_confidence
from came_optax._factored import scale_by_factored_rms

MaskOrFn = Any | None


def cast_to_param_dtype() -> optax.GradientTransformation:
    """Casts each update to its parameter's dtype (a no-op when ``params`` is None).

    The CAME stages compute in float32; this last stage hands bfloat16 parameters
    bfloat16 updates, as optax optimizers do.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = cast_to_param_dtype()
      >>> params = {'w': jnp.ones(2, jnp.bfloat16)}
      >>> tx.update({'w': jnp.ones(2)}, tx.init(params), params)[0]['w'].dtype
      dtype(bfloat16)
    """

    def update_fn(updates, state, params=None):
        if params is None:
            return updates, state
        return optax.tree.cast_like(updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_mask(mask: MaskOrFn) -> None:
    if mask is None or callable(mask):
        return
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)):
        raise ValueError(
            f"mask must be a callable or a pytree of booleans with the parameters' structure; "
            f"got the single value {mask!r}. optax.inject_hyperparams evaluates a callable "
            "mask as a schedule: pass static_args=('mask',) to keep it a mask."
        )


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.9999,
    eps1: float | jax.Array = 1e-30,
    eps2: float | jax.Array = 1e-16,
    clip_threshold: float | jax.Array | None = 1.0,
    weight_decay: float | jax.Array = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any | None = None,
    *,
    debias: bool = False,
    factored_dims: _factored.FactoredDims = "last_two",
    min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CAME: Confidence-guided Adaptive Memory Efficient Optimization.

  Adafactor's factored second moment, an RMS clip, momentum, and a factored
  estimate of the update's instability that scales the momentum down where it
  disagrees with the current update. Per leaf with gradient :math:`g_t`
  (Luo et al., 2023, Algorithm 1):

  .. math::

    V_t &= \text{factored EMA}_{\beta_2}(g_t^2 + \epsilon_1), \quad
    u_t = g_t / \sqrt{V_t} \\
    \hat u_t &= u_t / \max(1, \operatorname{RMS}(u_t) / d) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, \hat u_t \\
    S_t &= \text{factored EMA}_{\beta_3}((\hat u_t - m_t)^2 + \epsilon_2) \\
    \theta_t &= \theta_{t-1} - \eta_t \lambda \theta_{t-1} - \eta_t\, m_t / \sqrt{S_t}

  where a factored EMA keeps only row and column means (see
  :func:`scale_by_factored_rms`). Scalars and vectors keep a full
  :math:`V_t` and skip the confidence step (their update is :math:`m_t`).
  There is no bias correction. With default arguments this reproduces
  came-pytorch 0.1.3 to float32 rounding; all arithmetic is float32 even for
  bfloat16 or float16 gradients, and updates come back in each parameter's
  dtype.

  It has the state and the semantics of the chain
  :func:`scale_by_factored_rms`, ``optax.clip_by_block_rms``,
  :func:`scale_by_confidence` and a chain of ``optax.add_decayed_weights``,
  ``optax.scale_by_learning_rate`` and :func:`cast_to_param_dtype`; its
  update computes the first three stages jointly so that no parameter-sized
  temporary is kept (the results agree with the chain to float32 rounding).

  CAME's updates are not Adam-sized: early updates of matrices have an RMS of
  about 11 times the learning rate, so the best learning rate is usually
  several times below AdamW's (``debias=True`` removes most of that gap).

  Like came-pytorch, a NaN or Inf gradient enters the statistics for good;
  wrap the optimizer in ``optax.apply_if_finite`` to skip such steps. Finite
  gradients too large to square in float32 are rescaled (see
  :func:`scale_by_factored_rms`) instead of turning into NaN.

  Args:
    learning_rate: a float >= 0 or an optax schedule.
    b1: momentum decay, in [0, 1].
    b2: decay of the second-moment EMAs, in [0, 1) (at 1 the estimate never
      leaves zero).
    b3: decay of the instability EMAs, in [0, 1).
    eps1: regulariser added to :math:`g^2`, >= 0.
    eps2: regulariser added to the instability, >= 0.
    clip_threshold: the RMS :math:`d` above which each leaf's update is
      scaled down, > 0; None disables clipping.
    weight_decay: decoupled weight decay :math:`\lambda` >= 0, multiplied by
      the learning rate as in came-pytorch (and ``optax.adamw``).
    mask: which leaves get weight decay, as in ``optax.adamw``: a pytree of
      booleans or a callable of the params returning one. Under
      ``optax.inject_hyperparams`` pass ``static_args=('mask',)`` for a
      callable mask.
    mu_dtype: dtype of the stored momentum (``jnp.bfloat16`` halves it); None
      keeps float32. Under ``optax.inject_hyperparams`` pass it as a string
      (``'bfloat16'``) or in ``static_args``.
    debias: Adam-style bias correction of the second moment, the momentum and
      the instability (see :func:`scale_by_factored_rms` and
      :func:`scale_by_confidence`). Beyond the paper; off keeps parity.
    factored_dims: ``'last_two'`` (the reference) or ``'largest_two'`` (as
      ``optax.adafactor``); see :func:`factored_axes`.
    min_dim_size_to_factor: leaves whose factored axes are smaller keep full
      statistics; None (the reference) factors every leaf of rank >= 2. A
      static int: under ``optax.inject_hyperparams`` list it in
      ``static_args``.

  Returns:
    The optimizer, an ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import came_optax
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((jnp.ones(3) @ p['w'] + p['b'] - 1.0) ** 2)
    >>> tx = came_optax.came(learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
    Optimization, ACL 2023 (arXiv:2307.02047); came-pytorch 0.1.3.
  """
    if not callable(learning_rate):
        _checks.check_range("learning_rate", learning_rate, 0.0)
    if clip_threshold is not None:
        _checks.check_range("clip_threshold", clip_threshold, 0.0, low_inclusive=False)
    _checks.check_range("weight_decay", weight_decay, 0.0)
    _check_mask(mask)
    factoring = dict(factored_dims=factored_dims, min_dim_size_to_factor=min_dim_size_to_factor)
    tail = optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
        cast_to_param_dtype(),
    )
    stages = optax.chain(
        scale_by_factored_rms(b2, eps1, debias=debias, **factoring),
        optax.clip_by_block_rms(clip_threshold) if clip_threshold is not None else optax.identity(),
        scale_by_confidence(b1, b3, eps2, mu_dtype=mu_dtype, debias=debias, **factoring),
        tail,
    )
    # The update computes the first three stages jointly (see _fused); the state and
    # the values are those of ``stages``.
    hyperparams = dict(b1=b1, b2=b2, b3=b3, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold)

    def update_fn(updates, state, params=None, **extra_args):
        factored, clip_state, confidence, tail_state = state
        leaves, treedef = jax.tree.flatten(updates)
        axes = [
            _factored.factored_axes(jnp.shape(x), factored_dims, min_dim_size_to_factor)
            for x in leaves
        ]
        _factored.check_leaves(leaves, axes, factored.v_row, factored.v, "came")
        _checks.check_float_leaves(leaves, "updates")
        _confidence.check_updates(treedef, leaves, axes, confidence)
        updates, factored, confidence = _fused.precondition(
            updates, factored, confidence, axes, hyperparams, debias
        )
        updates, tail_state = tail.update(updates, tail_state, params, **extra_args)
        return updates, (factored, clip_state, confidence, tail_state)

    return optax.GradientTransformationExtraArgs(stages.init, update_fn)
