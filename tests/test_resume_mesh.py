"""A state saved on an 8-device FSDP x TP mesh resumes on 8, 4 and 1 devices and other meshes.

This file is also the worker that the tests run in fresh processes with simulated CPU devices::

    python tests/test_resume_mesh.py save DIR                 # 8 devices: train, save, go on
    python tests/test_resume_mesh.py resume DIR MESH...       # restore, go on, per MESH

``save`` trains ``SAVE_STEP`` steps on a (4, 2) mesh, saves parameters and optimizer state with
orbax, goes on to ``TOTAL_STEPS`` and writes the saved and the final trees as ``.npz``. ``resume``
restores, for each MESH (``FSDPxTP`` over the first devices, ``FSDPxTPr`` over them in reverse
order), into ``ShapeDtypeStruct``\\ s carrying the shardings that ``came_optax.state_shardings``
gives for the parameters placed on that mesh, trains the remaining steps and writes a JSON report
comparing both with the uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from _checkpoint_sharded_worker import SPECS, batch, init_params, loss_fn
from helpers import run_python
from jax.sharding import NamedSharding

import came_optax

TOTAL_STEPS, SAVE_STEP = 6, 3
SAVE_MESH = "4x2"


def _tx():
    return came_optax.came(1e-2, weight_decay=0.1)


def _mesh(name: str):
    """The mesh ``FSDPxTP`` over the first devices, or ``FSDPxTPr`` over them reversed.

    Its axes are ``data`` (batch and FSDP) and ``model`` (tensor parallelism), as ``SPECS``
    shards the parameters.
    """
    fsdp, tp = map(int, name.rstrip("r").split("x"))
    devices = jax.devices()[: fsdp * tp]
    if name.endswith("r"):
        devices = devices[::-1]
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(fsdp, tp), ("data", "model"), axis_types=(auto, auto)
    )


def _train(tx, params, opt_state, mesh, steps):
    shardings = (
        jax.tree.map(lambda p: p.sharding, params),
        came_optax.state_shardings(tx, params),
    )

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return jax.lax.with_sharding_constraint((params, opt_state), shardings)

    for t in steps:
        params, opt_state = step(params, opt_state, *batch(t, mesh))
    return params, opt_state


def _arrays(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def save(directory: Path) -> None:
    import orbax.checkpoint as ocp

    mesh, tx = _mesh(SAVE_MESH), _tx()
    params = init_params(mesh)
    opt_state = jax.jit(tx.init, out_shardings=came_optax.state_shardings(tx, params))(params)
    params, opt_state = _train(tx, params, opt_state, mesh, range(SAVE_STEP))
    saved = {"params": params, "opt_state": opt_state}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "checkpoint", saved)
    np.savez(directory / "saved.npz", **_arrays(saved))
    params, opt_state = _train(tx, params, opt_state, mesh, range(SAVE_STEP, TOTAL_STEPS))
    np.savez(directory / "uninterrupted.npz", **_arrays({"params": params, "opt_state": opt_state}))


def resume(directory: Path, mesh_name: str) -> None:
    import orbax.checkpoint as ocp

    mesh, tx = _mesh(mesh_name), _tx()
    # What a fresh process knows: the parameters' shapes, dtypes and shardings on its mesh.
    params = jax.eval_shape(lambda: init_params(mesh))
    params = jax.tree.map(
        lambda p, spec: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, spec)),
        params,
        SPECS,
    )
    opt_shardings = came_optax.state_shardings(tx, params)
    opt_target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        opt_shardings,
    )
    path = directory / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata.tree
        came_optax.check_state(metadata["opt_state"], tx, params)
        restored = checkpointer.restore(path, {"params": params, "opt_state": opt_target})
    placed = jax.tree.map(
        lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim),
        restored,
        {"params": params, "opt_state": opt_target},
    )
    saved = np.load(directory / "saved.npz")
    restored_arrays = _arrays(restored)
    report = {
        "devices": sorted({d.id for x in jax.tree.leaves(restored) for d in x.sharding.device_set}),
        "placed": all(jax.tree.leaves(placed)),
        "restored_bitwise": all(
            restored_arrays[k].tobytes() == saved[k].tobytes()
            and restored_arrays[k].dtype == saved[k].dtype
            for k in saved.files
        )
        and sorted(saved.files) == sorted(restored_arrays),
    }
    params, opt_state = _train(
        tx, restored["params"], restored["opt_state"], mesh, range(SAVE_STEP, TOTAL_STEPS)
    )
    resumed = _arrays({"params": params, "opt_state": opt_state})
    expected = np.load(directory / "uninterrupted.npz")
    report["bitwise"] = {k: resumed[k].tobytes() == expected[k].tobytes() for k in expected.files}
    report["max_rel"] = {
        k: float(
            np.max(np.abs(resumed[k].astype(np.float64) - expected[k]), initial=0.0)
            / max(float(np.max(np.abs(expected[k]), initial=0.0)), 1e-30)
        )
        for k in expected.files
    }
    (directory / f"resume_{mesh_name}.json").write_text(json.dumps(report))


# --- Tests ---------------------------------------------------------------------------------------

# Per process (its device count): the meshes it resumes on.
RESUMES = {
    "8 devices: (4, 2) as saved, (4, 2) on reversed devices, (2, 4)": (8, ["4x2", "4x2r", "2x4"]),
    "4 devices: (2, 2)": (4, ["2x2"]),
    "1 device": (1, ["1x1"]),
}
# Meshes with the saving mesh's shard counts: every reduction sums in the same order.
SAME_SHARDS = {"4x2", "4x2r"}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume_mesh")
    result = run_python([__file__, "save", str(directory)], devices=8, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_state_saved_on_8_devices_resumes_on_another_mesh(name, saved_run):
    devices, meshes = RESUMES[name]
    result = run_python([__file__, "resume", str(saved_run), *meshes], devices=devices, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for mesh in meshes:
        report = json.loads((saved_run / f"resume_{mesh}.json").read_text())
        fsdp, tp = map(int, mesh.rstrip("r").split("x"))
        assert report["devices"] == list(range(fsdp * tp)), mesh
        assert report["placed"], f"{mesh}: a restored leaf is not sharded as state_shardings says"
        assert report["restored_bitwise"], f"{mesh}: restoring changed a saved array"
        if mesh in SAME_SHARDS:
            assert all(report["bitwise"].values()), (mesh, report["bitwise"])
        else:
            # Other shard counts reorder the sums of the gradients and of the statistics' row
            # and column means, so the 3 steps after the restore agree to float32 rounding
            # (measured: at most 3.4e-7 of a leaf's largest entry).
            worst = max(report["max_rel"], key=report["max_rel"].get)
            assert report["max_rel"][worst] < 2e-6, (mesh, worst, report["max_rel"][worst])


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    else:
        for mesh_name in sys.argv[3:]:
            resume(Path(sys.argv[2]), mesh_name)
