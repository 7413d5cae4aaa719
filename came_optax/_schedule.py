"""How XLA is shown CAME's per-leaf math on each platform.

The math of every stage lives once, in :mod:`came_optax._factored` and
:mod:`came_optax._confidence`; it asks this module for three things that change
no value, only what the compiler does, and each is decided when the step is
lowered, so every platform compiles only its own program and one jitted
function still lowers for any platform:

* :func:`fresh` gives one full-size consumer its own inputs. On XLA:CPU a
  producer shared by several reductions is materialised into a fresh
  parameter-sized buffer every step; an ``optimization_barrier`` per consumer
  makes XLA fuse the producer into each. Elsewhere it lowers to nothing.
* :func:`mean`. On XLA:CPU an elementwise epilogue fused into a reduction makes
  it several times slower; a no-op ``reduce_precision`` fences it off.
  Elsewhere a plain mean.
* :func:`overflow_guard` replaces an overflowing second moment by a rescaled
  one. On CPU a ``lax.cond`` runs the rescaled reductions only when needed;
  on TPUs and GPUs, where a ``conditional`` costs a host round trip, a select
  between both candidates, computed in the same passes (for an unfactored
  leaf, the clip's reduction included, so it does not wait for the finiteness
  check).

The first two are primitives with a CPU lowering and a default lowering (an
``optimization_barrier`` inside a ``lax.platform_dependent`` branch would be
lost when XLA inlines the branch); the third is a ``platform_dependent``.
:func:`forced_plain` makes CPU compile the TPU/GPU program, for tests.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_forced_plain: list[bool] = []


@contextlib.contextmanager
def forced_plain() -> Iterator[None]:
    """Lowers the TPU/GPU program on every platform (tests run it on CPU)."""
    _forced_plain.append(True)
    try:
        yield
    finally:
        _forced_plain.pop()


def _identity_primitive(name: str, cpu_fn: Callable[..., Any]) -> Primitive:
    """A primitive that is the identity, lowered as ``cpu_fn`` on CPU."""
    primitive = Primitive(name)
    primitive.multiple_results = True
    primitive.def_impl(lambda *xs: xs)
    primitive.def_abstract_eval(lambda *avals: avals)
    batching.primitive_batchers[primitive] = lambda args, dims: (primitive.bind(*args), dims)
    ad.primitive_jvps[primitive] = lambda primals, tangents: (
        primitive.bind(*primals),
        list(tangents),
    )
    identity = mlir.lower_fun(lambda *xs: xs, multiple_results=True)
    on_cpu = mlir.lower_fun(cpu_fn, multiple_results=True)
    mlir.register_lowering(primitive, identity)
    mlir.register_lowering(
        primitive,
        lambda ctx, *args: (identity if _forced_plain else on_cpu)(ctx, *args),
        platform="cpu",
    )
    return primitive


def _barrier(*xs):
    return jax.lax.optimization_barrier(xs)


def _fence(*xs):
    return [
        jax.lax.reduce_precision(
            x, exponent_bits=jnp.finfo(x.dtype).nexp, mantissa_bits=jnp.finfo(x.dtype).nmant
        )
        for x in xs
    ]


_fresh_p = _identity_primitive("came_fresh", _barrier)
_fence_p = _identity_primitive("came_fence", _fence)


def fresh(tree: Any, consumer: str) -> Any:
    """The same arrays, as the inputs of the consumer named ``consumer`` (see the module doc).

    The name enters the barrier as a constant, so that XLA cannot merge the barriers of
    two consumers of the same arrays back into one.
    """
    leaves, treedef = jax.tree.flatten(tree)
    tag = jnp.int32(zlib.crc32(consumer.encode()) & 0x7FFFFFFF)
    return jax.tree.unflatten(treedef, _fresh_p.bind(tag, *leaves)[1:])


def mean(x: jax.Array, axis: int | None) -> jax.Array:
    """``jnp.mean``, fenced from what follows on CPU (see the module doc)."""
    total = jnp.sum(x, axis=axis)
    (total,) = _fence_p.bind(total)
    return total / (x.size // max(total.size, 1))


def _select(ok: jax.Array, plain: Callable[[], Any], rescaled: Callable[[], Any]) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), plain(), rescaled())


def _branch(ok: jax.Array, plain: Callable[[], Any], rescaled: Callable[[], Any]) -> Any:
    return jax.lax.cond(ok, plain, rescaled)


def overflow_guard(ok: jax.Array, plain: Callable[[], Any], rescaled: Callable[[], Any]) -> Any:
    """``plain()`` where ``ok``, else ``rescaled()``, with no conditional off CPU."""
    if _forced_plain:
        return _select(ok, plain, rescaled)
    return jax.lax.platform_dependent(
        ok,
        cpu=lambda ok: _branch(ok, plain, rescaled),
        default=lambda ok: _select(ok, plain, rescaled),
    )
