"""Writes golden CAME trajectories produced by came-pytorch 0.1.3.

The reference optimizer (torch, CPU, float32) is driven with gradient
sequences generated here with NumPy, not taken from a loss, so that any other
implementation can replay exactly the same float32 gradients and compare the
parameters after every step.

Regenerate (needs ``pip install torch came-pytorch==0.1.3``)::

    python tests/golden/make_golden.py

Output: ``tests/golden/came_pytorch_0_1_3.npz`` with these keys:

``meta``
    JSON string: reference and torch versions, seed, steps, case names and
    ``{leaf: shape}``.
``{case}/hparams``
    JSON string with ``learning_rate`` (``null`` for a scheduled case), ``b1``,
    ``b2``, ``b3``, ``eps1``, ``eps2``, ``clip_threshold``, ``weight_decay`` and
    ``description``.
``{case}/lrs``
    float64 ``[steps]``: the exact learning rate put on the param group before
    update ``t`` (0-based).
``{case}/{leaf}/init``
    float32 ``leaf_shape``: parameters before the first step.
``{case}/{leaf}/grads``
    float32 ``[steps, *leaf_shape]``: gradient fed to update ``t``.
``{case}/{leaf}/params``
    float32 ``[steps, *leaf_shape]``: parameters after update ``t``.
``{case}/{leaf}/update_rms``
    float32 ``[steps]``: RMS of the scaled gradient before clipping; clipping
    is active at step ``t`` where it exceeds ``clip_threshold``.

The ``schedule`` case's ``lrs`` equal, to float32, the values at ``count = t``
of::

    optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1e-2, warmup_steps=8, decay_steps=32,
        end_value=1e-3)

(they are computed here in float64 and rounded to float32; optax's float32
arithmetic lands within a few ulps, relative difference below 1e-6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEED = 20230705
STEPS = 32
OUT = Path(__file__).with_name("came_pytorch_0_1_3.npz")

LEAF_SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "vector": (7,),
    "matrix": (5, 6),
    "single_row": (1, 9),
    "single_col": (8, 1),
    "rank3": (3, 4, 5),
    "rank4": (2, 3, 4, 5),
}

DEFAULT_HPARAMS: dict[str, float] = {
    "b1": 0.9,
    "b2": 0.999,
    "b3": 0.9999,
    "eps1": 1e-30,
    "eps2": 1e-16,
    "clip_threshold": 1.0,
    "weight_decay": 0.0,
}

SCHEDULE = {
    "peak_value": 1e-2,
    "warmup_steps": 8,
    "decay_steps": 32,
    "end_value": 1e-3,
}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    learning_rate: float | None  # None: follow SCHEDULE
    step_scale: np.ndarray  # per-step multiplier of every gradient
    hparams: dict[str, float] = field(default_factory=dict)


def warmup_cosine_lrs(steps: int) -> np.ndarray:
    """Linear warm-up from 0, then cosine decay; float32-rounded, as float64."""
    peak, end = SCHEDULE["peak_value"], SCHEDULE["end_value"]
    warmup, decay = SCHEDULE["warmup_steps"], SCHEDULE["decay_steps"]
    t = np.arange(steps, dtype=np.float64)
    warm = peak * t / warmup
    count = np.minimum(t - warmup, decay - warmup)
    alpha = end / peak
    cosine = 0.5 * (1.0 + np.cos(np.pi * count / (decay - warmup)))
    decayed = peak * ((1.0 - alpha) * cosine + alpha)
    lrs = np.where(t < warmup, warm, decayed)
    # Rounded so a float32 schedule can reproduce the values the reference saw.
    return lrs.astype(np.float32).astype(np.float64)


def make_cases() -> list[Case]:
    ones = np.ones(STEPS)
    # Every fourth step the gradient shrinks 50x, which pulls the scaled
    # gradient's RMS under the threshold, so both clip branches are exercised.
    spiky = 1e2 * np.where(np.arange(STEPS) % 4 == 3, 0.02, 1.0)
    spiky[:4] = 1e2
    return [
        Case("default", "all defaults, lr 1e-2", 1e-2, ones),
        Case(
            "weight_decay",
            "decoupled weight decay 0.1, lr 1e-2",
            1e-2,
            ones,
            {"weight_decay": 0.1},
        ),
        Case(
            "hparams",
            "non-default betas, eps and clip threshold, lr 3e-3",
            3e-3,
            ones,
            {
                "b1": 0.8,
                "b2": 0.99,
                "b3": 0.999,
                "eps1": 1e-20,
                "eps2": 1e-12,
                "clip_threshold": 0.5,
            },
        ),
        Case(
            "no_clip_large",
            "gradients of scale 1e2 with periodic 50x drops; clip_threshold 1.0 "
            "is active on most steps and inactive on the dropped ones",
            1e-2,
            spiky,
            {"clip_threshold": 1.0},
        ),
        Case(
            "schedule",
            "lr from optax.warmup_cosine_decay_schedule(init_value=0.0, "
            "peak_value=1e-2, warmup_steps=8, decay_steps=32, end_value=1e-3) "
            "at count t",
            None,
            ones,
        ),
    ]


def make_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(0.5 * rng.normal(size=shape), dtype=np.float32)
        for name, shape in LEAF_SHAPES.items()
    }


def make_grads(
    rng: np.random.Generator, shape: tuple[int, ...], step_scale: np.ndarray
) -> np.ndarray:
    """Fixed signal plus per-step noise, with row and column scales.

    Rows and columns of very different magnitude are what make the factored
    second moment differ from a per-element one.
    """
    leaf_scale = 10.0 ** rng.uniform(-1.0, 1.0)
    if len(shape) >= 2:
        rows = np.exp(rng.normal(size=shape[:-1]))[..., :, None]
        cols = np.exp(rng.normal(size=shape[:-2] + shape[-1:]))[..., None, :]
        structure = rows * cols
    else:
        structure = np.exp(rng.normal(size=shape))
    signal = rng.normal(size=shape)
    noise = 0.7 * rng.normal(size=(len(step_scale), *shape))
    scale = step_scale.reshape((-1,) + (1,) * len(shape))
    return (scale * leaf_scale * structure * (signal + noise)).astype(np.float32)


def run_reference(
    init: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    lrs: np.ndarray,
    hparams: dict[str, float],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Steps came-pytorch; returns params after each step and update RMS."""
    import torch
    from came_pytorch import CAME

    params = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in init.items()}
    opt = CAME(
        list(params.values()),
        lr=1.0,  # placeholder: the constructor rejects 0, lrs[t] is set below
        eps=(hparams["eps1"], hparams["eps2"]),
        clip_threshold=hparams["clip_threshold"],
        betas=(hparams["b1"], hparams["b2"], hparams["b3"]),
        weight_decay=hparams["weight_decay"],
    )

    # The optimizer takes the RMS of each parameter and of each scaled
    # gradient; only the latter decides clipping, so keep those.
    param_ptrs = {p.data_ptr() for p in params.values()}
    seen: list[float] = []
    base_rms = opt._rms

    def recording_rms(tensor: torch.Tensor) -> torch.Tensor:
        value = base_rms(tensor)
        if tensor.data_ptr() not in param_ptrs:
            seen.append(float(value))
        return value

    opt._rms = recording_rms

    trajectory = {k: np.empty((STEPS, *v.shape), np.float32) for k, v in init.items()}
    update_rms = {k: np.empty(STEPS, np.float32) for k in init}
    for t in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = float(lrs[t])
        for name, p in params.items():
            p.grad = torch.from_numpy(np.array(grads[name][t]))
        seen.clear()
        opt.step()
        if len(seen) != len(params):
            raise RuntimeError(f"expected {len(params)} update RMS values, got {len(seen)}")
        # Parameters are visited in the order they were given.
        for name, value in zip(params, seen, strict=True):
            update_rms[name][t] = value
        for name, p in params.items():
            trajectory[name][t] = p.detach().numpy()
    return trajectory, update_rms


def check_schedule(lrs: np.ndarray) -> None:
    """Confirms the optax schedule reproduces ``lrs`` when optax is present."""
    try:
        import optax
    except ImportError:
        print("optax not installed; schedule not cross-checked")
        return
    schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, **SCHEDULE)
    got = np.array([schedule(t) for t in range(len(lrs))], dtype=np.float32)
    want = lrs.astype(np.float32)
    # optax evaluates the cosine in float32, which can be a few ulps off.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    exact = int(np.sum(got == want))
    worst = float(np.max(np.abs(got - want) / np.maximum(want, 1e-30)))
    print(
        f"optax schedule vs lrs: {exact}/{len(lrs)} bit-exact, max relative difference {worst:.1e}"
    )


def main() -> None:
    import came_pytorch
    import torch

    torch.set_num_threads(1)
    version = getattr(came_pytorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("came-pytorch")
    if version != "0.1.3":
        raise RuntimeError(f"need came-pytorch 0.1.3, found {version}")

    cases = make_cases()
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "reference": f"came-pytorch {version}",
        "torch": torch.__version__,
        "dtype": "float32",
        "seed": SEED,
        "steps": STEPS,
        "cases": [c.name for c in cases],
        "leaves": {k: list(v) for k, v in LEAF_SHAPES.items()},
    }
    arrays["meta"] = np.array(json.dumps(meta))

    for index, case in enumerate(cases):
        rng = np.random.default_rng([SEED, index])
        hparams = {**DEFAULT_HPARAMS, **case.hparams}
        if case.learning_rate is None:
            lrs = warmup_cosine_lrs(STEPS)
            check_schedule(lrs)
        else:
            lrs = np.full(STEPS, case.learning_rate, dtype=np.float64)
        init = make_params(rng)
        grads = {
            name: make_grads(rng, shape, case.step_scale) for name, shape in LEAF_SHAPES.items()
        }
        trajectory, update_rms = run_reference(init, grads, lrs, hparams)

        clipped = np.mean([np.mean(r > hparams["clip_threshold"]) for r in update_rms.values()])
        print(f"{case.name}: clipping active on {clipped:.0%} of leaf-steps")
        if case.name == "no_clip_large" and not 0.5 <= clipped < 1.0:
            raise RuntimeError("no_clip_large should clip on most, not all, steps")

        arrays[f"{case.name}/hparams"] = np.array(
            json.dumps(
                {"learning_rate": case.learning_rate, **hparams, "description": case.description}
            )
        )
        arrays[f"{case.name}/lrs"] = lrs
        for name in LEAF_SHAPES:
            arrays[f"{case.name}/{name}/init"] = init[name]
            arrays[f"{case.name}/{name}/grads"] = grads[name]
            arrays[f"{case.name}/{name}/params"] = trajectory[name]
            arrays[f"{case.name}/{name}/update_rms"] = update_rms[name]

    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
