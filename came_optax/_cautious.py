"""The cautious update mask (Liang et al., 2024) as a wrapper of any transformation.

The mask compares an update with the *raw* gradient. A stage later in an
``optax.chain`` only sees the previous stage's output, so the mask wraps the
transformation whose output it filters: :func:`cautious` calls ``inner.update``
on the gradients and masks the result against those same gradients. The
per-leaf arithmetic is :func:`cautious_factor`, which any other update rule can
call on its own update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from came_optax import _checks, _leaves


def cautious_factor(
    update: jax.Array, grad: jax.Array, floor: float | jax.Array, batch_dims: int = 0
) -> jax.Array:
    r"""The cautious mask of one leaf, rescaled to keep the update's scale.

    With :math:`\phi = \mathbb{1}[u \cdot g > 0]` elementwise (for complex
    leaves :math:`\phi = \mathbb{1}[\operatorname{Re}(\bar u\, g) > 0]`, the
    sign of the inner product of the two coordinates as vectors of
    :math:`\mathbb{R}^2`, which does not depend on whether both are conjugated)
    and the kept fraction :math:`k = \operatorname{mean}(\phi)` over the leaf:

    .. math::

      \text{factor} = \frac{\phi}{\max(k,\ \text{floor})}.

    The masked update is ``update * factor``. Coordinates where the update and
    the gradient disagree in sign, or where either is zero, get a factor of
    exactly 0; the kept ones get :math:`1/\max(k, \text{floor})`, so a leaf
    with nothing masked is unchanged and a leaf with nothing kept is exactly
    zero (for a finite update). A non-finite update coordinate stays non-finite
    (NaN where masked), so ``optax.apply_if_finite`` still sees it.

    This is the rule of the authors' reference code (C-Optim ``c_adamw.py``:
    ``mask / mask.mean().clamp(min=1e-3)``, the form also used by timm's
    ``caution`` option). The paper's first Algorithm scales by
    :math:`d / (\operatorname{nnz}(\phi) + 1)` instead, which differs by a
    factor :math:`k / (k + 1/d)` and shrinks an unmasked leaf slightly.

    The sign test is exact for real leaves (it compares signs, so tiny products
    do not underflow to "disagree"; subnormals count as zero where the platform
    flushes them). The factor is float32; ``k`` is a mean over the whole leaf,
    which XLA all-reduces when the leaf is sharded. With ``batch_dims``, ``k`` is
    taken per copy ``update[i, ...]`` along the leading axes.

    Args:
      update: one leaf of the update to mask.
      grad: the gradient leaf of the same shape.
      floor: lower bound on the kept fraction in the rescaling, in (0, 1]; a
        Python number or a scalar array.
      batch_dims: the number of leading axes that hold independent copies.

    Returns:
      A float32 array of ``update``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from came_optax._cautious import cautious_factor
      >>> cautious_factor(jnp.array([1.0, -2.0, 3.0, 0.5]),
      ...                 jnp.array([2.0, 1.0, 1.0, -1.0]), 1e-3)
      Array([2., 0., 2., 0.], dtype=float32)

    References:
      Liang, Chen, Liu and Liu, Cautious Optimizers: Improving Training with
      One Line of Code, 2024 (arXiv:2411.16085); reference code at
      https://github.com/kyleliang919/C-Optim.
    """
    if jnp.shape(update) != jnp.shape(grad):
        raise ValueError(
            f"cautious_factor: update and grad must have the same shape; got "
            f"{jnp.shape(update)} and {jnp.shape(grad)}."
        )
    if jnp.iscomplexobj(update) or jnp.iscomplexobj(grad):
        agree = jnp.real(jnp.conj(update) * grad) > 0
    else:
        agree = ((update > 0) & (grad > 0)) | ((update < 0) & (grad < 0))
    mask = agree.astype(jnp.float32)
    copy_axes = tuple(range(batch_dims, mask.ndim))
    kept_fraction = jnp.mean(mask, axis=copy_axes, keepdims=True, dtype=jnp.float32)
    return mask / jnp.maximum(kept_fraction, jnp.asarray(floor, jnp.float32))


def cautious(
    inner: optax.GradientTransformation,
    floor: float | jax.Array = 1e-3,
    batch_dims: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Masks ``inner``'s update where it disagrees in sign with the gradient.

    The cautious optimizer of Liang et al. (2024). For each leaf, with the raw
    gradient :math:`g_t` and :math:`u_t` = ``inner.update(g_t, ...)``:

    .. math::

      \phi_t = \mathbb{1}[u_t \cdot g_t > 0], \quad
      k_t = \operatorname{mean}(\phi_t), \quad
      \text{out}_t = \frac{\phi_t\, u_t}{\max(k_t,\ \text{floor})}

    (see :func:`cautious_factor` for the exact rule, complex leaves and its
    reference). The state is ``inner``'s state, unchanged; the output has each
    ``inner`` update's dtype. Extra arguments of ``update`` reach ``inner``.

    Decay and the learning rate stay outside the wrapper, so weight decay is
    never masked: cautious AdamW is
    ``optax.chain(cautious(optax.scale_by_adam()), optax.add_decayed_weights(wd),
    optax.scale_by_learning_rate(lr))``, the same chain as ``optax.adamw`` with
    the first stage wrapped.

    Args:
      inner: the transformation whose output is masked (for example
        ``optax.scale_by_adam()`` or ``optax.scale_by_lion()``).
      floor: lower bound on the kept fraction in the rescaling, in (0, 1];
        the default 1e-3 is the authors' reference code. May be injected with
        ``optax.inject_hyperparams``.
      batch_dims: leading axes of each leaf that hold independent copies, each
        with its own kept fraction: an int, a tree of ints like the parameters,
        or a callable of them (as :func:`came`'s).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import cautious
      >>> tx = optax.chain(cautious(optax.scale_by_adam()),
      ...                  optax.add_decayed_weights(0.5),
      ...                  optax.scale_by_learning_rate(0.1))
      >>> params = {'w': jnp.ones(3)}
      >>> grads = {'w': jnp.array([1.0, -1.0, 0.0])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(updates['w'].round(3))  # Adam's +-1 kept and scaled by 3/2; decay unmasked
      [-0.2   0.1  -0.05]

    References:
      Liang, Chen, Liu and Liu, Cautious Optimizers: Improving Training with
      One Line of Code, 2024 (arXiv:2411.16085).
    """
    _checks.check_range("floor", floor, 0.0, 1.0, low_inclusive=False)
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        inner_updates, state = inner.update(updates, state, params, **extra_args)

        dims = _leaves.batch_dims_of(batch_dims, updates, "cautious")

        def mask_leaf(u, g, b):
            compute_dtype = jnp.promote_types(u.dtype, jnp.float32)
            return (u.astype(compute_dtype) * cautious_factor(u, g, floor, b)).astype(u.dtype)

        masked = [
            mask_leaf(u, g, b)
            for u, g, b in zip(
                jax.tree.leaves(inner_updates), jax.tree.leaves(updates), dims, strict=True
            )
        ]
        return _leaves.like(inner_updates, masked), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
