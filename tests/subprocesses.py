"""Runs Python in a fresh process, for tests that need their own JAX configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(
    args: Sequence[str],
    *,
    devices: int | None = None,
    xla_flags: Sequence[str] = (),
    timeout: float,
) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", ""), *xla_flags]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    # The repository for the package, tests/ for the helpers the tests import.
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
