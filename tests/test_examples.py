"""``examples/``: each script trains, with tiny flags in a subprocess, and its losses fall.

Each test runs a script end to end and reads back its JSON: every loss it recorded is
finite, and a run ends well below where it started and below the loss of a uniform guess
(ln 256 nats per byte for the language model, ln 10 for the digits); the script also
prints its markdown table and writes its PNG. The full-size numbers are what the README
reports. Each test starts a fresh process that compiles one training loop per optimizer
(15-45 s on two CPU cores), so all are marked slow.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
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


# The cross-entropy of a uniform guess: a model that learnt nothing stays there.
UNIFORM_BYTE_LOSS, UNIFORM_DIGIT_LOSS = math.log(256), math.log(10)


def assert_lm_losses_fall(run: dict) -> None:
    """The batch losses are finite, the last five average at least one nat below the first
    five, and the final validation loss is half a nat below the uniform guess."""
    losses = np.asarray(run["train_losses"])
    assert np.all(np.isfinite(losses)), run["optimizer"]
    assert losses[-5:].mean() < losses[:5].mean() - 1.0, (run["optimizer"], losses)
    assert run["valid_loss"] < UNIFORM_BYTE_LOSS - 0.5, run["optimizer"]


@pytest.mark.slow
def test_train_lm_losses_fall_for_every_optimizer_and_are_reported(tmp_path):
    stdout = run_example(
        "train_lm.py", tmp_path, "--steps=40", "--log-every=20", "--eval-every=20",
        "--batch-size=4", "--seq-len=16", "--d-model=16", "--layers=1", "--heads=2",
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
    assert all(len(r["train_losses"]) == 40 for r in report["runs"])
    assert [step for step, _ in report["runs"][0]["valid_curve"]] == [20, 40]
    for run in report["runs"]:
        assert_lm_losses_fall(run)


@pytest.mark.slow
def test_train_lm_sweeps_lrs_and_seeds_and_every_run_learns(tmp_path):
    stdout = run_example(
        "train_lm.py", tmp_path, "--optimizers=came-debias", "--lr-came-debias=3e-3,1e-2",
        "--seeds=0,1", "--steps=40", "--log-every=40", "--eval-every=40", "--batch-size=4",
        "--seq-len=8", "--d-model=16", "--layers=1", "--heads=1",
    )  # fmt: skip
    assert "| came-debias | 0.003 |" in stdout and "| came-debias | 0.01 |" in stdout
    report = json.loads((tmp_path / "train_lm.json").read_text())
    assert [(r["lr"], r["seed"]) for r in report["runs"]] == [
        (3e-3, 0), (3e-3, 1), (1e-2, 0), (1e-2, 1),
    ]  # fmt: skip
    assert all(r["seeds"] == 2 for r in report["table"])
    for run in report["runs"]:
        assert_lm_losses_fall(run)


@pytest.mark.slow
def test_train_cnn_losses_fall_and_cautious_forms_differ_from_their_base(tmp_path):
    # One run of the default optimizers and the cautious forms. Each cautious form runs at its
    # base optimizer's tuned rate and keeps its base's state; its mask changes the trajectory,
    # so its test loss differs from the base's.
    pairs = {"came-debias-cautious": "came-debias", "adamw-cautious": "adamw"}
    names = ["came", "came-debias", "adamw", *pairs]
    stdout = run_example(
        "train_cnn.py", tmp_path, f"--optimizers={','.join(names)}", "--steps=30",
        "--eval-every=15", "--channels=4",
    )  # fmt: skip
    assert "| optimizer | peak lr | train loss | test loss | test acc. |" in stdout
    for name in names:
        assert f"| {name} |" in stdout
    assert (tmp_path / "train_cnn.png").stat().st_size > 0
    report = json.loads((tmp_path / "train_cnn.json").read_text())
    assert [r["optimizer"] for r in report["table"]] == names
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert [step for step, *_ in runs["came"]["curve"]] == [15, 30]
    for name, run in runs.items():
        test_losses = [loss for _, loss, _ in run["curve"]]
        assert all(map(math.isfinite, test_losses)), name
        # Falling between the evaluations, to under a quarter of the uniform guess.
        assert test_losses[-1] < test_losses[0], (name, test_losses)
        assert test_losses[-1] < UNIFORM_DIGIT_LOSS / 4, (name, test_losses)
    for cautious, base in pairs.items():
        assert runs[cautious]["lr"] == runs[base]["lr"]
        assert runs[cautious]["state_bytes"] == runs[base]["state_bytes"]
        assert runs[cautious]["valid_loss"] != runs[base]["valid_loss"]


@pytest.mark.slow
def test_convergence_study_finds_every_lr_of_its_grid_learns(tmp_path):
    stdout = run_example(
        "convergence_study.py", tmp_path, "--tasks=cnn", "--optimizers=adamw", "--seeds=0",
        "--steps=30",
    )  # fmt: skip
    assert "| optimizer | best lr | final loss, mean ± std |" in stdout
    assert "| adamw |" in stdout
    assert "The whole study took" in stdout
    assert (tmp_path / "convergence_study.png").stat().st_size > 0
    summary = json.loads((tmp_path / "convergence_study.json").read_text())
    (row,) = summary["results"]["cnn"]
    assert row["optimizer"] == "adamw"
    finals = [loss for losses in row["by_lr"].values() for loss in losses]
    assert len(finals) == 5 and all(map(math.isfinite, finals)), row["by_lr"]
    # Every rate of the grid leaves the uniform guess far behind; the best is the minimum.
    assert max(finals) < UNIFORM_DIGIT_LOSS / 2, row["by_lr"]
    assert row["mean"] == min(finals)


@pytest.mark.slow
def test_many_layers_grouped_and_scanned_came_follow_the_per_leaf_run(tmp_path):
    # With --cautious, so that the kept fraction per layer is covered too: over 40 small
    # steps its sign test has not turned rounding into drift.
    stdout = run_example(
        "many_layers.py", tmp_path, "--layers=3", "--d-model=16", "--steps=40",
        "--batch-size=4", "--seq-len=16", "--cautious",
    )  # fmt: skip
    assert "| model | optimizer | options | leaves | state arrays | compile s |" in stdout
    assert (tmp_path / "many_layers.png").stat().st_size > 0
    report = json.loads((tmp_path / "many_layers.json").read_text())
    for run in report["runs"]:
        assert_lm_losses_fall(run)
    came = {(r["model"], r["options"]): r for r in report["runs"] if r["optimizer"] == "came"}
    per_leaf = came["unscanned", "per leaf"]["train_losses"]
    # Both start from the same weights and see the same batches: grouping the leaves, or
    # scanning the layers and saying so with batch_dims, leaves only float32 rounding.
    for same in [("unscanned", "group_leaves=True"), ("scanned", "batch_dims=1 on blocks")]:
        np.testing.assert_allclose(came[same]["train_losses"], per_leaf, rtol=1e-4, err_msg=same)
    # Without batch_dims the stacked layers are one tensor each: another optimizer, whose
    # losses leave that tolerance.
    drifted = came["scanned", "batch_dims=0"]["train_losses"]
    assert not np.allclose(drifted, per_leaf, rtol=1e-4, atol=0)
