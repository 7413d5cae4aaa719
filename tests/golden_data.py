"""Loads the came-pytorch 0.1.3 trajectories in ``golden/`` (see ``golden/make_golden.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).parent / "golden" / "came_pytorch_0_1_3.npz"
CASES = ["default", "weight_decay", "hparams", "no_clip_large", "schedule"]
# float64 model vs float32 reference, relative to how far each leaf moved.
RTOL_OF_MOVEMENT = 1e-5

HPARAM_KEYS = ("b1", "b2", "b3", "eps1", "eps2", "clip_threshold", "weight_decay")


def load_case(name: str) -> dict[str, Any]:
    with np.load(GOLDEN) as z:
        meta = json.loads(z["meta"][()])
        hparams = json.loads(z[f"{name}/hparams"][()])
        leaves = list(meta["leaves"])
        return {
            "hparams": {k: hparams[k] for k in HPARAM_KEYS},
            "learning_rate": hparams["learning_rate"],
            "lrs": z[f"{name}/lrs"],
            "init": {k: z[f"{name}/{k}/init"] for k in leaves},
            "grads": {k: z[f"{name}/{k}/grads"] for k in leaves},
            "params": {k: z[f"{name}/{k}/params"] for k in leaves},
            "update_rms": {k: z[f"{name}/{k}/update_rms"] for k in leaves},
            "steps": meta["steps"],
        }


def unstack(grads: dict[str, np.ndarray], steps: int) -> list[dict[str, np.ndarray]]:
    return [{k: g[t] for k, g in grads.items()} for t in range(steps)]
