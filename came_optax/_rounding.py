"""Stochastic rounding of bfloat16 and float16 parameters, as the last stage of an optax chain.

Round-to-nearest in bfloat16 drops any update smaller than half a unit in the last place of
the parameter (``2**-9`` to ``2**-8`` of its value), so long runs in bfloat16 stall. Rounding
up or down at random, with the probabilities that make the expected result exact, keeps small
updates on average. The random bits come from the step count and the leaf index alone: the
state is one counter, a resumed run repeats the uninterrupted one bit for bit, and replicas
round identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_NAME = "stochastic_round_to_param_dtype"


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_round_to_param_dtype`.

    Attributes:
      count: number of updates rounded so far (int32); with the seed it selects the bits.
    """

    count: jax.Array


def _round_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """Stochastic rounding of finite float32 ``x`` to bfloat16 with uniform uint32 ``bits``."""
    low = jnp.right_shift(bits, jnp.uint32(16))
    pattern = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = jnp.bitwise_and(pattern + low, jnp.uint32(0xFFFF0000))
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def _round_float16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """Stochastic rounding of finite float32 ``x`` to float16 with uniform uint32 ``bits``.

    float16's spacing at ``|x|`` is ``2**(e - 10)`` for a float32 exponent ``e >= -14`` and
    ``2**-24`` below; it is built from ``x``'s exponent bits, so every step is exact in float32
    and the result does not depend on how a compiler treats float16 intermediates (XLA:GPU may
    drop a float32 -> float16 -> float32 round trip). Magnitudes from 65504 up to 65536 round
    to infinity with probability proportional to their distance from 65504, as in bfloat16.
    """
    magnitude = jnp.abs(x)
    exponent = jnp.right_shift(jax.lax.bitcast_convert_type(magnitude, jnp.uint32), 23)
    spacing_exponent = jnp.maximum(exponent, jnp.uint32(127 - 14)) - jnp.uint32(10)
    spacing = jax.lax.bitcast_convert_type(jnp.left_shift(spacing_exponent, 23), jnp.float32)
    low = jnp.floor(magnitude / spacing) * spacing
    # Both the difference and the division by a power of two are exact.
    fraction = (magnitude - low) / spacing
    uniform = jnp.right_shift(bits, jnp.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)
    rounded = (low + jnp.where(uniform < fraction, spacing, 0.0)).astype(jnp.float16)
    return jnp.where(jnp.signbit(x), -rounded, rounded)


_ROUNDERS = {jnp.dtype(jnp.bfloat16): _round_bfloat16, jnp.dtype(jnp.float16): _round_float16}


def _exact_update(rounded: jax.Array, param: jax.Array) -> jax.Array:
    """The float32 update that ``optax.apply_updates`` turns from ``param`` into ``rounded``."""
    return rounded.astype(jnp.float32) - param.astype(jnp.float32)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(
            f"seed must be a Python int in [0, 2**32); got {type(seed).__name__}. Under "
            "optax.inject_hyperparams, pass static_args=('seed',)."
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32); got {seed}.")


def _check_leaf(path, param) -> bool:
    """True for leaves to round; False for leaves already in float32 or wider."""
    dtype = jnp.result_type(param)
    if dtype in _ROUNDERS:
        return True
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return False
    raise TypeError(
        f"{_NAME} rounds bfloat16 and float16 parameters and passes float32 and wider ones "
        f"through; parameter {jax.tree_util.keystr(path)} has dtype {dtype}. Exclude it with "
        "optax.masked or optax.partition."
    )


def stochastic_round_to_param_dtype(seed: int = 0) -> optax.GradientTransformation:
    r"""Updates that make ``optax.apply_updates`` stochastically round bf16/fp16 parameters.

    For a bfloat16 or float16 parameter :math:`p` and the incoming update :math:`u`, let
    :math:`x = p + u` in float32 and :math:`x_\downarrow, x_\uparrow` the two neighbours of
    :math:`x` in the parameter's dtype toward and away from zero. The new parameter is

    .. math::

      \operatorname{sr}(x) = \begin{cases}
        x_\uparrow & \text{with probability } f = (|x| - |x_\downarrow|)
          / (|x_\uparrow| - |x_\downarrow|) \\
        x_\downarrow & \text{otherwise,}
      \end{cases}
      \qquad \mathbb{E}[\operatorname{sr}(x)] = x,

    so a value that the dtype represents never moves, and updates far below the
    parameter's resolution still act on average. This stage returns the float32 updates
    :math:`u' = \operatorname{sr}(x) - p`, for which ``optax.apply_updates`` (a float32
    addition and a cast) yields :math:`\operatorname{sr}(x)`. It must be the last stage
    of the chain, after ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``,
    so that :math:`x` is the complete step, weight decay included.

    **Bits.** Leaf :math:`i` (in ``jax.tree.leaves(params)`` order) at the update with
    ``count`` :math:`t` (0 for the first) draws
    ``b = jax.random.bits(k, p.shape, jnp.uint32)`` with
    ``k = fold_in(fold_in(key(seed, impl='threefry2x32'), t), i)``. bfloat16: the float32
    bit pattern of :math:`x` plus ``b >> 16``, with the low 16 bits cleared (a carry into the
    kept bits happens with probability exactly :math:`f`). float16: :math:`x_\uparrow` when
    ``(b >> 8) * 2**-24`` :math:`< f`; :math:`f` is computed exactly, so the rounding is
    unbiased for :math:`|x| \ge 2^{-25}` (below, the bias is under :math:`2^{-48}`). The
    bits are a function of the key and the shape only, so under ``jax.jit`` the result does
    not depend on the mesh or the sharding, and data-parallel replicas round alike (jax's
    default partitionable threefry draws each shard locally). The values depend on the
    ``jax_threefry_partitionable`` setting: resume with the one the run started with.
    Above the largest finite value, :math:`x_\uparrow` is infinity and :math:`f` is measured
    to the next power of two, as if the exponent range went on.

    **Exactness of** :math:`u'`. For ``a = sr(x)`` and ``b = p`` in bfloat16 (8-bit
    significands), ``float32(a) - float32(b)`` is exact when their exponents differ by at
    most 15, and ``apply_updates`` then returns ``a``. Checked exhaustively (every finite
    ``a`` against a binade of ``b`` for bfloat16, where the arithmetic is scale-invariant;
    all pairs for float16), the result is ``a`` whenever ``a == 0`` or
    :math:`|a| \ge 2^{-16}|b|` (float16: :math:`2^{-13}|b|`). A smaller nonzero ``a``, from a
    step that cancels :math:`p` to five significant digits, is out of reach of any float32
    update, since ``p + u'`` near zero lies on a grid of spacing about :math:`2^{-24}|p|`:
    the parameter lands within :math:`2^{-24}|p|` of ``a``, float32's resolution at
    :math:`p`. Subnormal float32 values follow the platform (XLA flushes them to zero),
    ``-0.0`` may come back as ``+0.0``, and a sign flip of a parameter near the largest
    bfloat16 value, where ``a - b`` overflows float32, gives infinity.

    **Other leaves.** float32 and wider parameters are already in the precision of the
    sum: their updates pass through unchanged (a documented no-op), so mixed-precision
    trees need no mask. Other dtypes raise a TypeError. Updates of any floating dtype are
    read as float32. Where :math:`x` is NaN or infinite the update passes through unchanged.

    Args:
      seed: an int in [0, 2**32) that selects the random bits, static.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`StochasticRoundingState`;
      its update needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from came_optax import stochastic_round_to_param_dtype
      >>> tx = optax.chain(optax.sgd(1e-3), stochastic_round_to_param_dtype(seed=0))
      >>> params = {'w': jnp.ones(4, jnp.bfloat16)}
      >>> updates, state = tx.update({'w': jnp.full(4, -1.0)}, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)['w']
      >>> new.dtype, set(new.tolist()) <= {1.0, 1.0078125}
      (dtype(bfloat16), True)

    References:
      Gupta et al., Deep Learning with Limited Numerical Precision, ICML 2015
      (arXiv:1502.02551); Zamirai et al., Revisiting BFloat16 Training (arXiv:2010.06192);
      Croci et al., Stochastic rounding: implementation, error analysis and applications,
      R. Soc. Open Sci. 9:211631, 2022.
    """
    _check_seed(seed)

    def init_fn(params):
        del params
        return StochasticRoundingState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{_NAME} needs params: call update(updates, state, params) so that each "
                "update can round its parameter."
            )
        paths_and_params, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = treedef.flatten_up_to(updates)
        step_key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), state.count)
        out = []
        for i, ((path, p), u) in enumerate(zip(paths_and_params, leaves, strict=True)):
            if not _check_leaf(path, p):
                out.append(u)
                continue
            bits = jax.random.bits(jax.random.fold_in(step_key, i), jnp.shape(p), jnp.uint32)
            u = jnp.asarray(u, jnp.float32)
            p = jnp.asarray(p)
            x = p.astype(jnp.float32) + u
            finite = jnp.isfinite(x)
            rounded = _ROUNDERS[p.dtype](jnp.where(finite, x, 0.0), bits)
            out.append(jnp.where(finite, _exact_update(rounded, p), u))
        return jax.tree.unflatten(treedef, out), StochasticRoundingState(
            optax.safe_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)
