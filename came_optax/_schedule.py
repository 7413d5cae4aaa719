"""How XLA is shown CAME's per-leaf math on each platform.

The math of every stage lives once, in :mod:`came_optax._factored` and
:mod:`came_optax._confidence`; it asks a :class:`Schedule` for three things
that change no value, only what the compiler does:

* ``fresh(x)``: the inputs of one full-size consumer;
* ``mean(x, axis)``: a mean;
* ``overflow_guard``: how the rescaled second moment of an overflowing leaf
  replaces the plain one.

:data:`XLA` is the plain program, the one TPUs and GPUs compile: no barriers,
and the overflow guard is a select between two reductions computed in the same
pass, so no ``conditional`` (a host round trip on GPU) is emitted.
:data:`XLA_CPU` works around three habits of XLA:CPU: a producer shared by
several reductions is materialised into a fresh parameter-sized buffer each
step (``optimization_barrier`` gives each consumer its own inputs, so the
producer fuses into each); an elementwise epilogue fused into a reduction
makes it several times slower (a no-op ``reduce_precision`` fences it off); and
recomputing the rescaled reductions every step would double the slowest loops
(a ``lax.cond`` runs them only when a leaf overflows).

:func:`run` picks the schedule when the step is lowered
(``jax.lax.platform_dependent``), so each platform compiles only its own
program and one jitted function still lowers for any platform.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def _plain_mean(x: jax.Array, axis: int | None) -> jax.Array:
    return jnp.mean(x, axis=axis)


def _fenced_mean(x: jax.Array, axis: int | None) -> jax.Array:
    info = jnp.finfo(x.dtype)
    total = jnp.sum(x, axis=axis)
    total = jax.lax.reduce_precision(total, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return total / (x.size // max(total.size, 1))


def _select(ok: jax.Array, plain: Callable[[], Any], rescaled: Callable[[], Any]) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), plain(), rescaled())


def _branch(ok: jax.Array, plain: Callable[[], Any], rescaled: Callable[[], Any]) -> Any:
    return jax.lax.cond(ok, lambda: plain(), lambda: rescaled())


class Schedule(NamedTuple):
    """One platform's way of lowering the same math (see the module doc)."""

    name: str
    fresh: Callable[[Any], Any]
    mean: Callable[[jax.Array, int | None], jax.Array]
    overflow_guard: Callable[..., Any]
    # ``overflow_guard(ok, plain, rescaled)``: ``plain()`` where ``ok``, else ``rescaled()``;
    # ``plain`` may be computed either way, ``rescaled`` only when needed or in the same pass.


XLA = Schedule("xla", fresh=lambda x: x, mean=_plain_mean, overflow_guard=_select)
XLA_CPU = Schedule(
    "xla_cpu",
    fresh=jax.lax.optimization_barrier,
    mean=_fenced_mean,
    overflow_guard=_branch,
)

_forced: list[Schedule] = []


@contextlib.contextmanager
def forced(schedule: Schedule) -> Iterator[None]:
    """Traces with ``schedule`` on every platform (tests run the TPU/GPU program on CPU)."""
    _forced.append(schedule)
    try:
        yield
    finally:
        _forced.pop()


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(schedule, *args)`` with the schedule of the platform the step is lowered for."""
    if _forced:
        return fn(_forced[-1], *args)
    return jax.lax.platform_dependent(
        *args,
        cpu=lambda *a: fn(XLA_CPU, *a),
        default=lambda *a: fn(XLA, *a),
    )
