"""Smoke tests of ``examples/``: each script runs end to end with tiny flags in a subprocess.

They check that a script exits cleanly, prints its markdown table and writes its PNG
and JSON; the numbers themselves are what the README reports from full-size runs. Each
starts a fresh process that compiles one training loop per optimizer (20-35 s on two
CPU cores), so all are marked slow.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from helpers import REPO, run_python

for module in ("flax", "matplotlib", "sklearn", "tqdm"):
    pytest.importorskip(module)


def run_example(script: str, out: pathlib.Path, *flags: str) -> str:
    """Runs ``examples/<script>`` with ``flags``, writing into ``out``; returns its stdout."""
    script = str(REPO / "examples" / script)
    result = run_python([script, *flags, f"--out={out}", "--no-progress"], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_train_lm_prints_table_and_writes_plot(tmp_path):
    stdout = run_example(
        "train_lm.py", tmp_path, "--steps=4", "--log-every=2", "--eval-every=2",
        "--batch-size=2", "--seq-len=16", "--d-model=16", "--layers=1", "--heads=2",
    )  # fmt: skip
    columns = "train loss | valid loss | state bytes (vs adamw) | with int8 mu (vs adamw) | step ms"
    assert f"| optimizer | peak lr | {columns} |" in stdout
    names = ["came", "came-debias", "came-debias-cautious", "adamw", "adafactor"]
    for name in names:
        assert f"| {name} |" in stdout
    assert (tmp_path / "train_lm.png").stat().st_size > 0
    report = json.loads((tmp_path / "train_lm.json").read_text())
    assert [r["optimizer"] for r in report["table"]] == names
    rows = {r["optimizer"]: r for r in report["table"]}
    # AdamW keeps two float32 copies of the parameters; CAME forms keep an int8 momentum
    # smaller than their float32 one, and other optimizers have no int8 form.
    assert rows["adamw"]["state_bytes"] == rows["adamw"]["adamw_state_bytes"]
    for name in names[:3]:
        assert 0 < rows[name]["int8_state_bytes"] < rows[name]["state_bytes"]
    assert rows["adamw"]["int8_state_bytes"] is None
    assert all(len(r["train_losses"]) == 4 for r in report["runs"])
    assert [step for step, _ in report["runs"][0]["valid_curve"]] == [2, 4]


@pytest.mark.slow
def test_train_lm_sweeps_lrs_and_seeds(tmp_path):
    stdout = run_example(
        "train_lm.py", tmp_path, "--optimizers=came-debias", "--lr-came-debias=1e-3,3e-3",
        "--seeds=0,1", "--steps=2", "--log-every=2", "--eval-every=2", "--batch-size=2",
        "--seq-len=8", "--d-model=8", "--layers=1", "--heads=1",
    )  # fmt: skip
    assert "| came-debias | 0.001 |" in stdout and "| came-debias | 0.003 |" in stdout
    report = json.loads((tmp_path / "train_lm.json").read_text())
    assert [(r["lr"], r["seed"]) for r in report["runs"]] == [
        (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1),
    ]  # fmt: skip
    assert all(r["seeds"] == 2 for r in report["table"])


@pytest.mark.slow
def test_train_cnn_reports_every_optimizer_and_cautious_forms_apart_from_their_base(tmp_path):
    # One run of the default optimizers and the cautious forms. Each cautious form runs at its
    # base optimizer's tuned rate and keeps its base's state; its mask changes the trajectory,
    # so after 4 steps its test loss differs from the base's.
    pairs = {"came-debias-cautious": "came-debias", "adamw-cautious": "adamw"}
    names = ["came", "came-debias", "adamw", *pairs]
    stdout = run_example(
        "train_cnn.py", tmp_path, f"--optimizers={','.join(names)}", "--steps=4",
        "--eval-every=2", "--channels=4",
    )  # fmt: skip
    assert "| optimizer | peak lr | train loss | test loss | test acc. |" in stdout
    for name in names:
        assert f"| {name} |" in stdout
    assert (tmp_path / "train_cnn.png").stat().st_size > 0
    report = json.loads((tmp_path / "train_cnn.json").read_text())
    assert [r["optimizer"] for r in report["table"]] == names
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert [step for step, *_ in runs["came"]["curve"]] == [2, 4]
    for cautious, base in pairs.items():
        assert runs[cautious]["lr"] == runs[base]["lr"]
        assert runs[cautious]["state_bytes"] == runs[base]["state_bytes"]
        losses = [runs[name]["curve"][-1][1] for name in (cautious, base)]
        assert all(map(math.isfinite, losses))
        assert losses[0] != losses[1]


@pytest.mark.slow
def test_convergence_study_prints_tables_and_writes_plot(tmp_path):
    stdout = run_example(
        "convergence_study.py", tmp_path, "--tasks=cnn", "--optimizers=adamw", "--seeds=0",
        "--steps=2",
    )  # fmt: skip
    assert "| optimizer | best lr | final loss, mean ± std |" in stdout
    assert "| adamw |" in stdout
    assert "The whole study took" in stdout
    assert (tmp_path / "convergence_study.png").stat().st_size > 0
    summary = json.loads((tmp_path / "convergence_study.json").read_text())
    assert summary["results"]["cnn"][0]["optimizer"] == "adamw"
