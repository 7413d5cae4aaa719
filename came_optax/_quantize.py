r"""Blockwise absmax int8 quantization of the momentum (``mu_dtype="int8"``).

A leaf is cut into blocks of 256 elements; each block keeps one float32 scale
:math:`s = \max_{b}|x| / 127` (a product with float32(1/127)) and its elements as int8
:math:`q = \operatorname{round}(x \cdot \mathrm{fl}(1/s))` in :math:`[-127, 127]`. Dequantizing
multiplies: :math:`\hat x = q\, s`.

**Where the blocks lie.** A block is a tile of 256 elements over a leaf's last two axes (a run of
256 along a vector), the squarest of 16x16, 8x32, 32x8, 4x64, 64x4, 2x128, 128x2, 1x256, 256x1
whose sides divide those axes. The scales have the leaf's shape with each tiled axis divided by
the tile's side, so they shard like the parameter, and a block never straddles a shard as long as
each shard's extent along the tiled axes is a multiple of the tile's side there (for 16x16 tiles:
any mesh axis that divides the axis into pieces of a multiple of 16). Leaves with fewer than 4096
elements, or whose last two axes admit no tile, keep a float32 momentum, as bitsandbytes and
torchao keep small tensors in 32 bits. The rule reads only the shape, so the state's layout does
not depend on the mesh and a checkpoint restores on any other.

**How they are computed.** Off TPUs the leaf is viewed as its tiles, a reshape that moves no
data there. A TPU lays out an array's last two axes in tiles of 8 rows by 128 lanes, and that
reshape would copy the leaf into padded tiles; there, where a block's height is a multiple of 8,
the maxima are taken over groups of 8 rows (a view the TPU reads in place), then by reduce-windows
over the rest of the block in an array an eighth of the leaf's size, and the scales are repeated
back the same way. Both give the same values, and each platform compiles only its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

# Elements per block, and the smallest leaf that is quantized (smaller ones stay float32).
BLOCK_ELEMENTS = 256
MIN_ELEMENTS = 4096
LEVELS = 127
# A multiplication, not a division by 127: compilers turn the division by a constant into this
# product anyway (XLA:CPU does), so every platform computes the same scales.
_INVERSE_LEVELS = np.float32(1.0 / LEVELS)
# Tiles over the last two axes, squarest first: the shorter the longest side, the more meshes
# shard a leaf without splitting a block.
_TILES = ((16, 16), (8, 32), (32, 8), (4, 64), (64, 4), (2, 128), (128, 2), (1, 256), (256, 1))
# A TPU lays out an array's last two axes in tiles of 8 rows by 128 lanes: grouping rows by 8
# moves no data.
_ROW_GROUP = 8


def block_shape(shape: tuple[int, ...], batch_dims: int = 0) -> tuple[int, ...] | None:
    """The block of a leaf of shape ``shape``, as a shape of the same rank, or None.

    None means the leaf is not quantized: fewer than 4096 elements, a scalar, or last two axes
    (last axis for a vector) that no tile of 256 elements divides. With ``batch_dims``, the
    rule applies to each copy ``shape[batch_dims:]``, and the block spans one copy.

    Example:
      >>> from came_optax._quantize import block_shape
      >>> block_shape((768, 3072)), block_shape((50257, 768)), block_shape((8192,))
      ((16, 16), (1, 256), (256,))
      >>> block_shape((64, 32)) is None, block_shape((3, 5000)) is None
      (True, True)
      >>> block_shape((12, 768), batch_dims=1) is None, block_shape((12, 8192), batch_dims=1)
      (True, (1, 256))
    """
    if batch_dims:
        block = block_shape(shape[batch_dims:])
        return None if block is None else (1,) * batch_dims + block
    if len(shape) == 0 or math.prod(shape) < MIN_ELEMENTS:
        return None
    if len(shape) == 1:
        return (BLOCK_ELEMENTS,) if shape[0] % BLOCK_ELEMENTS == 0 else None
    rows, cols = shape[-2:]
    for tile in _TILES:
        if rows % tile[0] == 0 and cols % tile[1] == 0:
            return (1,) * (len(shape) - 2) + tile
    return None


def block_of(shape: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
    """The block of a quantized leaf of shape ``shape`` whose scales have shape ``scales``."""
    return tuple(n // s for n, s in zip(shape, scales, strict=True))


def scale_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """The scales' shape: ``shape`` with each axis divided by the block's side."""
    return tuple(n // b for n, b in zip(shape, block, strict=True))


def explicit_spec(x: jax.Array) -> tuple[Any, ...] | None:
    """Per axis of ``x``, the explicit mesh axes it is sharded over; None without any."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return tuple(None if e is None else e if isinstance(e, tuple) else (e,) for e in spec)


class _Layout(NamedTuple):
    """Where a leaf's blocks are found: a view of the leaf, and the blocks' maxima and spread in it.

    ``view`` maps the leaf to the view and ``unview`` back; ``block_max`` reduces a view to the
    scales' shape; ``spread`` lays scales out against the view, for elementwise products.
    """

    view: Callable[[jax.Array], jax.Array]
    unview: Callable[[jax.Array], jax.Array]
    block_max: Callable[[jax.Array], jax.Array]
    spread: Callable[[jax.Array], jax.Array]


def _blocked(x: jax.Array, block: tuple[int, ...], spec: tuple[Any, ...] | None) -> jax.Array:
    """``x`` with each axis split into (blocks, side): blocks on even axes, sides on odd ones.

    Under explicit sharding the blocks keep each axis's mesh axes (jax asks for them).
    """
    shape = sum(((n // b, b) for n, b in zip(x.shape, block, strict=True)), ())
    if spec is None:
        return x.reshape(shape)
    return jax.lax.reshape(x, shape, out_sharding=P(*sum(((e, None) for e in spec), ())))


def _unblocked(x: jax.Array, shape: tuple[int, ...], spec: tuple[Any, ...] | None) -> jax.Array:
    if spec is None:
        return x.reshape(shape)
    return jax.lax.reshape(x, shape, out_sharding=P(*spec))


def _side_axes(block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(1, 2 * len(block), 2))


def _tiles(shape: tuple[int, ...], block: tuple[int, ...], spec: tuple[Any, ...] | None) -> _Layout:
    """The leaf cut into its blocks: one axis per block index and per side (free off TPUs)."""
    sides = _side_axes(block)
    return _Layout(
        view=lambda x: _blocked(x, block, spec),
        unview=lambda x: _unblocked(x, shape, spec),
        block_max=lambda x: jnp.max(x, axis=sides),
        spread=lambda scale: jnp.expand_dims(scale, sides),
    )


def _row_groups(block: tuple[int, ...]) -> tuple[int, ...] | None:
    """The block over the maxima of 8-row groups, where the block's height is a multiple of 8."""
    if len(block) < 2 or block[-2] % _ROW_GROUP:
        return None
    return block[:-2] + (block[-2] // _ROW_GROUP, block[-1])


def _window_max(x: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """Each block's maximum, as a reduce-window."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, block, block, "VALID")


def _window_repeat(scale: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """Each scale repeated over its block, as a reduce-window.

    Dilated by the block, the scales hold one element per block's side along each axis (the
    rest is the -inf identity); the window of the block's size ending at an output holds
    exactly one of them, its block's, and the maximum returns it exactly.
    """
    padding = tuple((b - 1, b - 1) for b in block)
    ones = (1,) * len(block)
    return jax.lax.reduce_window(
        scale, -jnp.inf, jax.lax.max, block, ones, padding, base_dilation=block
    )


def _rows(groups: tuple[int, ...], spec: tuple[Any, ...] | None) -> _Layout:
    """The leaf itself; its blocks' rows taken 8 at a time (the TPU's tiles), then reduce-windows.

    ``groups`` is the block over the 8-row maxima (:func:`_row_groups`). Only arrays an eighth
    of the leaf's size change shape, and the 8-row broadcast fuses into its consumer.
    """

    def block_max(x: jax.Array) -> jax.Array:
        split = x.shape[:-2] + (x.shape[-2] // _ROW_GROUP, _ROW_GROUP, x.shape[-1])
        in_groups = (
            x.reshape(split)
            if spec is None
            else jax.lax.reshape(x, split, out_sharding=P(*spec[:-1], None, spec[-1]))
        )
        return _window_max(jnp.max(in_groups, axis=-2), groups)

    def spread(scale: jax.Array) -> jax.Array:
        rows = _window_repeat(scale, groups)
        tiled = rows.shape[:-1] + (_ROW_GROUP, rows.shape[-1])
        shape = rows.shape[:-2] + (rows.shape[-2] * _ROW_GROUP, rows.shape[-1])
        return _unblocked(jnp.broadcast_to(jnp.expand_dims(rows, -2), tiled), shape, spec)

    return _Layout(view=lambda x: x, unview=lambda x: x, block_max=block_max, spread=spread)


def _per_platform(fn: Callable[..., Any], x: jax.Array, block: tuple[int, ...], *args: Any) -> Any:
    """``fn(x, *args, layout=...)``: on a TPU in :func:`_rows` where they apply, else in tiles.

    A TPU lays out an array's last two axes in tiles of 8 rows by 128 lanes, so cutting a leaf
    into 16x16 blocks copies it (with the padding of 16 lanes to 128); both layouts give the same
    values, and each platform compiles only its own.
    """
    spec = explicit_spec(x)
    tiles = _tiles(x.shape, block, spec)
    groups = _row_groups(block)
    if groups is None:
        return fn(x, *args, layout=tiles)
    return jax.lax.platform_dependent(
        x,
        *args,
        tpu=functools.partial(fn, layout=_rows(groups, spec)),
        default=functools.partial(fn, layout=tiles),
    )


def _quantize(x: jax.Array, layout: _Layout) -> tuple[jax.Array, jax.Array]:
    view = layout.view(x)
    scale = layout.block_max(jnp.abs(view)) * _INVERSE_LEVELS
    inverse = layout.spread(1.0 / jnp.where(scale > 0, scale, 1.0))
    q = jnp.clip(jnp.round(view * inverse), -LEVELS, LEVELS)
    return layout.unview(q.astype(jnp.int8)), scale


def _dequantize(q: jax.Array, scale: jax.Array, dtype: Any, layout: _Layout) -> jax.Array:
    return layout.unview(layout.view(q).astype(dtype) * layout.spread(scale.astype(dtype)))


def _check_shards(x: jax.Array, block: tuple[int, ...], spec: tuple[Any, ...] | None) -> None:
    """Raises ValueError where an explicit sharding of ``x`` would split a block."""
    if spec is None:
        return
    sizes = jax.typeof(x).sharding.mesh.shape
    for n, b, names in zip(x.shape, block, spec, strict=True):
        shards = math.prod(sizes[a] for a in names or ())
        if (n // shards) % b:
            raise ValueError(
                f"mu_dtype='int8': a momentum of shape {x.shape} sharded {P(*spec)} has "
                f"shards of {n // shards} along an axis whose blocks have {b} elements, so a "
                "block would straddle two shards. Shard that axis into pieces of a multiple of "
                f"{b}, or give the leaf another mu_dtype (optax.partition)."
            )


def quantize(x: jax.Array, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    r"""Blockwise absmax int8 quantization: returns ``(q, scale)``.

    Per block :math:`b`, :math:`s_b = \max_{i \in b} |x_i| \cdot \mathrm{fl}(1/127)` (float32) and
    :math:`q_i = \operatorname{clip}(\operatorname{round}(x_i \cdot \mathrm{fl}(1/s_b)), -127, 127)`
    (int8, round half to even; 127 levels on each side of an exact zero, so the map is
    symmetric). The product with each scale's reciprocal is what XLA:CPU makes of a division by a
    broadcast; spelled out, every platform evaluates the same formula. A block of zeros
    gets :math:`s_b = 0` and :math:`q = 0`. Round-to-nearest bounds the error of every element by
    half a level, :math:`|q_i s_b - x_i| \le s_b / 2 \approx \max_b|x| / 254` (to float32
    rounding), and quantizing a dequantized array returns the same ``q`` (its scales move by at
    most one unit in the last place). An infinite element makes its block's scale infinite, so
    the dequantized block is not finite either (whether a NaN propagates is the platform's
    maximum's: XLA:CPU's vectorized reductions may drop it).

    Args:
      x: a real array (any floating dtype).
      block: the block's shape (see :func:`block_shape`); each side divides its axis.

    Returns:
      ``q``, int8 of ``x``'s shape, and ``scale``, float32 of :func:`scale_shape`.

    Example:
      >>> import jax.numpy as jnp
      >>> from came_optax._quantize import quantize, dequantize
      >>> q, scale = quantize(jnp.array([1.0, -0.5, 0.25, 0.0]), (2,))
      >>> q.tolist(), scale.shape
      ([127, -64, 127, 0], (2,))
      >>> [round(x, 4) for x in dequantize(q, scale, (2,)).tolist()]
      [1.0, -0.5039, 0.25, 0.0]

    References:
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022
      (arXiv:2110.02861), with a linear map instead of their dynamic one; torchao's 8-bit
      optimizers use blocks of 256.
    """
    _check_shards(x, block, explicit_spec(x))
    return _per_platform(_quantize, x.astype(jnp.float32), block)


def dequantize(
    q: jax.Array, scale: jax.Array, block: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
    """``q`` times its block's scale, in ``dtype``: the inverse of :func:`quantize`."""
    return _per_platform(functools.partial(_dequantize, dtype=dtype), q, block, scale)


def zero_scales(zeros: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """Zero scales from parameter-shaped ``zeros``: a strided slice, which keeps their sharding."""
    return jax.lax.slice(zeros, (0,) * zeros.ndim, zeros.shape, block)
