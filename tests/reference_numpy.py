"""Float64 NumPy model of CAME, used as an independent oracle in tests.

For one leaf with gradient ``g`` at step ``t`` (1-based), with ``mean_a`` the mean
over axis ``a``::

    s = g**2 + eps1
    rank >= 2:
        v_row <- b2 * v_row + (1 - b2) * mean_{-1}(s)
        v_col <- b2 * v_col + (1 - b2) * mean_{-2}(s)
        V = (v_row / mean_{-1}(v_row))[..., :, None] * v_col[..., None, :]
    rank < 2:
        V <- b2 * V + (1 - b2) * s
    u = g / sqrt(V)
    u <- u / max(1, rms(u) / clip_threshold)     # rms over the whole leaf
    m <- b1 * m + (1 - b1) * u
    rank >= 2:
        r = (u - m)**2 + eps2
        R = factored EMA of r with decay b3, reconstructed exactly like V
        update = m / sqrt(R)
    rank < 2:
        update = m
    p <- p - lr * weight_decay * p - lr * update

``debias=True`` (an extension beyond the paper) divides ``V`` by ``1 - b2**t``
before it scales ``g``, and computes ``update = mhat / sqrt(R / (1 - b3**t))``
(``update = mhat`` for rank < 2) with ``mhat = m / (1 - b1**t)``; the
instability ``r`` still uses the raw ``m``.

API: :func:`init_state` and :func:`came_step` advance one step at a time;
:func:`came_numpy` runs a whole gradient sequence. Only NumPy is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = Mapping[str, np.ndarray]
LeafState = dict[str, np.ndarray]


def _factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _ema_factored(
    row: np.ndarray, col: np.ndarray, x: np.ndarray, decay: float
) -> tuple[np.ndarray, np.ndarray]:
    row = decay * row + (1.0 - decay) * x.mean(axis=-1)
    col = decay * col + (1.0 - decay) * x.mean(axis=-2)
    return row, col


def _reconstruct(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    # Normalising the row factor makes row x col carry the scale of the
    # column means only once.
    row = row / row.mean(axis=-1, keepdims=True)
    return row[..., :, None] * col[..., None, :]


def init_leaf_state(shape: tuple[int, ...]) -> LeafState:
    """Zero state for one leaf: momentum plus full or factored moments."""
    state: LeafState = {"mu": np.zeros(shape)}
    if _factored(shape):
        row_shape, col_shape = shape[:-1], shape[:-2] + shape[-1:]
        state["v_row"] = np.zeros(row_shape)
        state["v_col"] = np.zeros(col_shape)
        state["r_row"] = np.zeros(row_shape)
        state["r_col"] = np.zeros(col_shape)
    else:
        state["v"] = np.zeros(shape)
    return state


def init_state(params: Params) -> dict[str, LeafState]:
    """Zero state for every leaf of a flat ``{name: array}`` dict."""
    return {name: init_leaf_state(np.shape(p)) for name, p in params.items()}


def _leaf_step(
    p: np.ndarray,
    g: np.ndarray,
    state: LeafState,
    *,
    count: int,
    learning_rate: float,
    b1: float,
    b2: float,
    b3: float,
    eps1: float,
    eps2: float,
    clip_threshold: float | None,
    weight_decay: float,
    debias: bool,
) -> tuple[np.ndarray, LeafState, float]:
    state = dict(state)
    s = np.square(g) + eps1
    if _factored(g.shape):
        state["v_row"], state["v_col"] = _ema_factored(state["v_row"], state["v_col"], s, b2)
        v = _reconstruct(state["v_row"], state["v_col"])
    else:
        state["v"] = b2 * state["v"] + (1.0 - b2) * s
        v = state["v"]
    if debias:
        v = v / (1.0 - b2**count)
    u = g / np.sqrt(v)

    update_rms = _rms(u)
    if clip_threshold is not None:
        u = u / max(1.0, update_rms / clip_threshold)

    m = b1 * state["mu"] + (1.0 - b1) * u
    state["mu"] = m
    m_hat = m / (1.0 - b1**count) if debias else m

    if _factored(g.shape):
        r = np.square(u - m) + eps2
        state["r_row"], state["r_col"] = _ema_factored(state["r_row"], state["r_col"], r, b3)
        big_r = _reconstruct(state["r_row"], state["r_col"])
        if debias:
            big_r = big_r / (1.0 - b3**count)
        update = m_hat / np.sqrt(big_r)
    else:
        update = m_hat

    new_p = p - learning_rate * weight_decay * p - learning_rate * update
    return new_p, state, update_rms


def came_step(
    params: Params,
    grads: Params,
    state: Mapping[str, LeafState],
    *,
    count: int,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float | None = 1.0,
    weight_decay: float = 0.0,
    debias: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, LeafState], dict[str, float]]:
    """One CAME step on every leaf, in float64.

    Args:
      params: flat ``{name: array}`` dict of parameters.
      grads: gradients with the same keys and shapes.
      state: per-leaf state from :func:`init_state` or a previous step.
      count: 1-based index of this step (only used when ``debias``).
      learning_rate: step size for this step.
      b1, b2, b3: decays of momentum, squared-gradient and instability EMAs.
      eps1, eps2: added to squared gradient and to instability.
      clip_threshold: RMS cap of the scaled gradient; ``None`` disables it.
      weight_decay: decoupled decay, scaled by ``learning_rate``.
      debias: apply bias correction (see module docstring).

    Returns:
      ``(new_params, new_state, update_rms)`` where ``update_rms[name]`` is the
      RMS of ``g / sqrt(V)`` before clipping (clipping is active when it exceeds
      ``clip_threshold``).
    """
    new_params: dict[str, np.ndarray] = {}
    new_state: dict[str, LeafState] = {}
    update_rms: dict[str, float] = {}
    for name, p in params.items():
        new_params[name], new_state[name], update_rms[name] = _leaf_step(
            np.asarray(p, dtype=np.float64),
            np.asarray(grads[name], dtype=np.float64),
            state[name],
            count=count,
            learning_rate=float(learning_rate),
            b1=b1,
            b2=b2,
            b3=b3,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            debias=debias,
        )
    return new_params, new_state, update_rms


def came_numpy(
    params: Params,
    grads_per_step: Sequence[Params],
    *,
    learning_rate: float | Sequence[float],
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float | None = 1.0,
    weight_decay: float = 0.0,
    debias: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Runs CAME over ``grads_per_step`` and returns the params after each step.

    ``learning_rate`` is a constant or one value per step (``learning_rate[t]``
    is used by the update with 0-based index ``t``). Defaults match the
    paper's reference implementation; see :func:`came_step` for the rest.
    """
    steps = len(grads_per_step)
    if np.ndim(learning_rate) == 0:
        lrs = [float(learning_rate)] * steps  # type: ignore[arg-type]
    else:
        lrs = [float(x) for x in learning_rate]  # type: ignore[union-attr]
        if len(lrs) != steps:
            raise ValueError(f"learning_rate has {len(lrs)} entries for {steps} steps")

    current = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    state = init_state(current)
    trajectory = []
    for t, grads in enumerate(grads_per_step):
        current, state, _ = came_step(
            current,
            grads,
            state,
            count=t + 1,
            learning_rate=lrs[t],
            b1=b1,
            b2=b2,
            b3=b3,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            debias=debias,
        )
        trajectory.append(current)
    return trajectory
