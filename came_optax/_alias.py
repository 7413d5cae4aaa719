"""The ``came`` optimizer: CAME's stages chained like ``optax.adamw``."""

from __future__ import annotations

from typing import Any

import jax
import optax

from came_optax import _cautious, _checks, _factored
from came_optax._came import came_transformation
from came_optax._rounding import stochastic_round_to_param_dtype

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
    cautious: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    batch_dims: Any = None,
    group_leaves: bool = False,
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
  :func:`scale_by_factored_second_moment`). Scalars and vectors keep a full
  :math:`V_t` and skip the confidence step (their update is :math:`m_t`).
  There is no bias correction. With default arguments this reproduces
  came-pytorch 0.1.3 to float32 rounding; all arithmetic is float32 even for
  bfloat16 or float16 gradients (complex64 for complex parameters, whose
  statistics use :math:`|g|^2` as ``optax.adam``'s do), and updates come back in
  each parameter's dtype.

  It reads like ``optax.adamw``: ``optax.chain(``:func:`scale_by_came`\ ``,
  optax.add_decayed_weights, optax.scale_by_learning_rate,``
  :func:`cast_to_param_dtype`\ ``)``, where :func:`scale_by_came` has the
  values of :func:`scale_by_factored_second_moment`,
  ``optax.clip_by_block_rms`` and :func:`scale_by_confidence` chained. The
  state is that chain's: ``state[0]`` is a :class:`ScaleByCameState` holding
  the one step count (``optax.tree.get(state, 'count')``), the momentum
  ``mu`` and the statistics, each a tree with the parameters' structure.
  ``update`` needs ``params``, as ``optax.adamw``'s does.

  CAME's updates are not Adam-sized: early updates of matrices have an RMS of
  about 11 times the learning rate, so the best learning rate is usually
  several times below AdamW's (``debias=True`` removes most of that gap).

  Like came-pytorch, a NaN or Inf gradient enters the statistics for good;
  wrap the optimizer in ``optax.apply_if_finite`` to skip such steps. Means of
  finite gradients too large to square in float32 saturate (see
  :func:`scale_by_factored_second_moment`) instead of turning into NaN.

  Args:
    learning_rate: a float >= 0 or an optax schedule (None is an error).
    b1: momentum decay, in [0, 1].
    b2: decay of the second-moment EMAs, in [0, 1) (at 1 the estimate never
      leaves zero).
    b3: decay of the instability EMAs, in [0, 1).
    eps1: regulariser added to :math:`|g|^2`, >= 0.
    eps2: regulariser added to the instability, >= 0.
    clip_threshold: the RMS :math:`d` above which each leaf's update is
      scaled down, > 0; None disables clipping.
    weight_decay: decoupled weight decay :math:`\lambda` >= 0, multiplied by
      the learning rate as in came-pytorch (and ``optax.adamw``).
    mask: which leaves get weight decay, as in ``optax.adamw``: a pytree of
      booleans or a callable of the params returning one. Under
      ``optax.inject_hyperparams`` pass ``static_args=('mask',)`` for a
      callable mask.
    mu_dtype: dtype of the stored momentum: ``jnp.bfloat16`` halves it;
      ``'int8'`` stores it blockwise quantized with float32 block scales (see
      :func:`scale_by_confidence`), about a quarter; None keeps float32
      (complex64 for complex parameters). Beyond the reference. Under
      ``optax.inject_hyperparams`` pass it as a string (``'bfloat16'``) or in
      ``static_args``.
    debias: Adam-style bias correction of the second moment, the momentum and
      the instability (see :func:`scale_by_factored_second_moment` and
      :func:`scale_by_confidence`). Beyond the paper; off keeps parity.
    factored_dims: ``'last_two'`` (the reference) or ``'largest_two'`` (as
      ``optax.adafactor``); see :func:`factored_axes`.
    min_dim_size_to_factor: leaves whose factored axes are smaller keep full
      statistics; None (the reference) factors every leaf of rank >= 2. A
      static int: under ``optax.inject_hyperparams`` list it in
      ``static_args``.
    cautious: the cautious mask of Liang et al. (2024): zero the update where
      its sign disagrees with the gradient's and rescale the rest by the kept
      fraction (see :func:`cautious`), before weight decay, so decay is never
      masked. Beyond the paper; off keeps parity.
    stochastic_rounding: end with :func:`stochastic_round_to_param_dtype`
      instead of :func:`cast_to_param_dtype`, so that bfloat16 or float16
      parameters after ``optax.apply_updates`` are an unbiased stochastic
      rounding of the float32 step (weight decay included); float32 parameters
      are unaffected. Beyond the paper.
    seed: the stochastic rounding's seed, a Python int in [0, 2**32); under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    batch_dims: the number of leading axes of each leaf that hold independent
      copies, such as the layer axis of blocks stacked for ``nnx.scan`` or
      ``jax.lax.scan``: an int for every leaf, a tree of ints with the
      parameters' structure, or a callable of the parameters returning one
      (as ``mask``). Everything CAME computes over a leaf is then computed per
      copy: the factored statistics (over the remaining axes), the RMS clip,
      the cautious kept fraction and the int8 blocks, so a ``(layers, m, n)``
      leaf with ``batch_dims=1`` is updated exactly as ``layers`` separate
      ``(m, n)`` leaves. None, the default, is 0 for every leaf (the
      reference's view of a tensor): the clip and the kept fraction span all
      copies, and a stacked vector is factored as a matrix. A leaf with fewer
      axes than its ``batch_dims`` is an error. Under
      ``optax.inject_hyperparams`` list it in ``static_args`` unless it is a
      tree.
    group_leaves: stack leaves of one shape, dtype and ``batch_dims`` into one
      array per group, keep the state that way, and update each group at once
      (as a leaf with one more batch axis), so a model of many same-shaped
      layers costs a few large kernels instead of several per leaf, and
      compiles faster. The values are those of per-leaf CAME to float32
      rounding. The state's statistics become :class:`Grouped` stacks instead
      of trees like the parameters (see README, "Many layers", for
      checkpoints, sharding and ``optax.tree.map_params``); convert a state
      between the two layouts with :func:`upgrade_state`. Leaves that must not
      be stacked together (sharded differently under auto mesh axes) belong in
      separate ``optax.partition`` groups.

  Returns:
    The optimizer, an ``optax.GradientTransformationExtraArgs``. Its
    ``update(grads, state, params)`` requires ``params``.

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

    Four layers stacked for a scan, each with its own statistics and clip; and
    four separate layers kept as one stacked group:

    >>> stacked = {'w': jnp.ones((4, 3, 2))}
    >>> came_optax.came(1e-3, batch_dims=1).init(stacked)[0].v_row['w'].shape
    (4, 3)
    >>> layers = [jnp.ones((3, 2)) for _ in range(4)]
    >>> came_optax.came(1e-3, group_leaves=True).init(layers)[0].mu.stacks[0].shape
    (4, 3, 2)

  References:
    Luo et al., CAME: Confidence-guided Adaptive Memory Efficient
    Optimization, ACL 2023 (arXiv:2307.02047); came-pytorch 0.1.3.
  """
    if learning_rate is None:
        raise ValueError(
            "came: learning_rate must be a float >= 0 or an optax schedule; got None. For "
            "unscaled updates chain came_optax.scale_by_came() yourself."
        )
    if not callable(learning_rate):
        _checks.check_range("learning_rate", learning_rate, 0.0)
    _checks.check_range("weight_decay", weight_decay, 0.0)
    _check_mask(mask)
    _checks.check_bool("cautious", cautious)
    preconditioner = came_transformation(
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
        who="came",
    )
    tx = optax.chain(
        _cautious.cautious(preconditioner, batch_dims=batch_dims) if cautious else preconditioner,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
        stochastic_round_to_param_dtype(seed) if stochastic_rounding else cast_to_param_dtype(),
    )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "came: update needs the parameters, for weight decay and to return updates in "
                "each parameter's dtype: call tx.update(grads, state, params)."
            )
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
