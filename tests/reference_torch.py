"""Runs came-pytorch 0.1.3 live, with optax-style argument names (tests skip without it)."""

from __future__ import annotations

import numpy as np
import pytest


def run_came_pytorch(
    init: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    learning_rate: float,
    *,
    dtype: str = "float32",
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
) -> dict[str, np.ndarray]:
    """Params after every step, as float32 arrays ``[steps, *leaf]``.

    ``grads[name]`` stacks one gradient per step; ``dtype`` is the torch parameter dtype.
    """
    torch = pytest.importorskip("torch")
    came_pytorch = pytest.importorskip("came_pytorch")
    torch.set_num_threads(1)
    tdtype = getattr(torch, dtype)

    def tensor(x):
        return torch.tensor(np.asarray(x, np.float32)).to(tdtype)

    params = {k: torch.nn.Parameter(tensor(v)) for k, v in init.items()}
    opt = came_pytorch.CAME(
        list(params.values()),
        lr=learning_rate,
        betas=(b1, b2, b3),
        eps=(eps1, eps2),
        clip_threshold=clip_threshold,
        weight_decay=weight_decay,
    )
    steps = len(next(iter(grads.values())))
    history = {k: [] for k in init}
    for t in range(steps):
        for k, p in params.items():
            p.grad = tensor(grads[k][t])
        opt.step()
        for k, p in params.items():
            history[k].append(p.detach().float().numpy().copy())
    return {k: np.stack(v) for k, v in history.items()}
