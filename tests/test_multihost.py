"""Two processes on loopback train CAME on one global mesh, as one process would.

``jax.distributed.initialize`` joins two processes of 4 CPU devices each (CPU
collectives over gloo) into an 8-device ``(data, model)`` mesh; the parameters
after a few steps must equal single-device training. Each worker runs
``tests/_multihost_worker.py``; the coordinator port is a free loopback port
picked by the OS, and both processes are killed if either fails or overruns.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import REPO, load_module, python_env

WORKER = REPO / "tests" / "_multihost_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 240
TOLERANCE = 1e-6


def free_loopback_port() -> int:
    # Bound to port 0 the OS picks a free port; it is released just before the
    # coordinator binds it, so a retry covers the rare case that something takes it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(out_path: Path) -> list[str]:
    """Runs the workers to completion; returns their outputs, killing all on any failure."""
    env = python_env()
    env["JAX_PLATFORMS"] = "cpu"
    # The workers pick their device count themselves; a forced count would override it.
    env.pop("XLA_FLAGS", None)
    port = free_loopback_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(out_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = [""] * NUM_PROCESSES
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            # One failed process leaves the other waiting on collectives: stop early.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            outputs[i] = p.communicate(timeout=30)[0]
    codes = [p.returncode for p in procs]
    report = "\n".join(
        f"--- process {i} (exit {c}) ---\n{o}"
        for i, (c, o) in enumerate(zip(codes, outputs, strict=True))
    )
    assert codes == [0] * NUM_PROCESSES, f"multi-host workers failed on port {port}:\n{report}"
    return outputs


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_match_single_process_training(tmp_path):
    out_path = tmp_path / "params.npz"
    try:
        outputs = run_workers(out_path)
    except AssertionError as first_failure:
        if "address" not in str(first_failure).lower():
            raise
        outputs = run_workers(out_path)  # the free port was taken meanwhile
    assert all("8 global devices, done" in o for o in outputs), outputs

    worker = load_module("tests/_multihost_worker.py")
    x, y = worker.batches()
    want, _ = worker.train(worker.init_params(), x, y)
    got = np.load(out_path)
    assert sorted(got.files) == sorted(worker.SHAPES)
    for name in worker.SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name)
        # The run moved the parameters well beyond the tolerance.
        assert np.max(np.abs(got[name] - worker.init_params()[name])) > 1e3 * TOLERANCE
    assert jax.device_count() == 1  # this process kept its single device
