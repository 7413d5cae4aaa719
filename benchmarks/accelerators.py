"""Compiled cost of one optimizer step on TPUs and GPUs, measured ahead of time without a device.

XLA compiles the donated step ``params, state = apply(tx.update(grads, state, params))`` for a
described chip (libtpu's TPU topologies; the CUDA plugin with a GPU description from
``benchmarks/gpu_specs/``) and reads what the compiled program will do, never how long it takes:

* **B/param**: HBM bytes the per-chip program reads and writes, over the parameter elements the
  chip holds: over the kernels of the entry computation, the bytes of their operands and results
  that live in HBM, plus what the TPU's staging copies move to or from HBM. A step that reads
  ``g, p, mu, nu`` and writes ``p, mu, nu`` in float32 moves 28 B/param (``optax.adamw``).
  **XLA bytes** is XLA's own cost analysis (TPU only: the GPU compiler gives none); it also
  counts the traffic of on-chip memory (VMEM), so only its ratios compare.
* **kernels**: top-level operations of the entry computation that run on the device (fusions,
  copies, custom calls, collectives, conditionals, unfused ops; not the TPU's staging copies);
  **fusions** counts the fusions alone. Each is a kernel launch on a GPU and a separately
  scheduled program region on a TPU. A conditional counts once, not the kernels of its branches.
* **conditionals**: ``conditional`` instructions anywhere in the program (data-dependent
  branches a TPU's scalar core must resolve); **collectives**: all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute instructions anywhere in the program.
* **temp** and **state/chip**: XLA's temporary buffer size and the optimizer state's bytes per
  chip under its shardings.

The parameters are float32; on the 8-chip meshes they are sharded FSDP x TP: each leaf's largest
axis over ``data`` and its next largest over ``model`` where the sizes divide, vectors
replicated. The state takes ``came_optax.state_shardings``; params and state are donated.

Needs libtpu for the TPU targets (``pip install -e ".[tpu]"``) and ``jax-cuda12-plugin`` and
``jax-cuda12-pjrt`` of jax's version for the GPU targets; no accelerator. From the repository root::

    python benchmarks/accelerators.py --model gpt2-4
    python benchmarks/accelerators.py --model llama-1b --target tpu-v5e-8,h100 --markdown
    python benchmarks/accelerators.py --model gpt2-small --optimizers "came,came grouped,adamw"
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import _models
import jax
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

import came_optax

# Config: the optimizers compared (ratios are to BASELINE's), the models and the compile targets.
OPTIMIZERS = {
    "came": came_optax.came(1e-3),
    "came grouped": came_optax.came(1e-3, group_leaves=True),
    "came debias": came_optax.came(1e-3, debias=True),
    "came bf16 mu": came_optax.came(1e-3, mu_dtype="bfloat16"),
    "came int8 mu": came_optax.came(1e-3, mu_dtype="int8"),
    "came debias cautious": came_optax.came(1e-3, debias=True, cautious=True),
    "adamw": optax.adamw(1e-3),
    "adafactor": optax.adafactor(1e-3),
}
BASELINE = "adamw"

MODELS = {
    "gpt2-4": _models.gpt2(768, 4, vocab=_models.GPT2_PADDED_VOCAB),
    "gpt2-small": _models.gpt2(768, 12, vocab=_models.GPT2_PADDED_VOCAB),
    "gpt2-medium": _models.gpt2(1024, 24, vocab=_models.GPT2_PADDED_VOCAB),
    "vit-b16": _models.vit(768, 12),
    # 0.95B: full-width k/v (no grouped-query attention), untied 32000-token head.
    "llama-1b": _models.llama(2048, 16, mlp=5632, vocab=32000),
}

GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for: a libtpu topology name or a GPU description file, and a mesh."""

    platform: str  # "tpu" or "cuda"
    topology: str  # libtpu topology name, or the file in gpu_specs/
    mesh: tuple[int, int]  # (data, model)


TARGETS = {
    "tpu-v5e-1": Target("tpu", "v5e:1x1", (1, 1)),
    "tpu-v5e-8": Target("tpu", "v5e:2x4", (4, 2)),
    "tpu-v5p-1": Target("tpu", "v5p:1x1x1", (1, 1)),
    "tpu-v5p-8": Target("tpu", "v5p:2x2x2", (4, 2)),
    "tpu-v6e-1": Target("tpu", "v6e:1x1", (1, 1)),
    "tpu-v6e-8": Target("tpu", "v6e:2x4", (4, 2)),
    "h100": Target("cuda", "h100_sxm.txtpb", (1, 1)),
    "a100": Target("cuda", "a100_sxm_80gb.txtpb", (1, 1)),
}
DEFAULT_TARGETS = ("tpu-v5e-1", "tpu-v5e-8", "h100", "a100")

MESH_AXES = ("data", "model")


@functools.cache
def mesh(target: str) -> jax.sharding.Mesh:
    """The (data, model) mesh of compile-only devices of ``target``."""
    t = TARGETS[target]
    if t.platform == "tpu":
        # Compiling claims no TPU: a process that holds libtpu's lockfile (any JAX process that
        # looked for a TPU) must not block it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # A single chip is its own host; libtpu's default host is 2x2x1 chips.
        extra = {"chips_per_host_bounds": [1, 1, 1]} if math.prod(t.mesh) == 1 else {}
        topology = topologies.get_topology_desc(platform="tpu", topology_name=t.topology, **extra)
    else:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=(GPU_SPECS / t.topology).read_text(), topology="1x1x1"
        )
    return topologies.make_mesh(topology, t.mesh, MESH_AXES)


def param_spec(shape: tuple[int, ...], mesh_shape: dict[str, int]) -> PartitionSpec:
    """FSDP x TP: the largest axis over ``data``, the next over ``model``, where they divide."""
    if len(shape) < 2:
        return PartitionSpec()
    spec = [None] * len(shape)
    by_size = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis, name in zip(by_size, MESH_AXES, strict=False):
        if shape[axis] % mesh_shape[name] == 0:
            spec[axis] = name
    return PartitionSpec(*spec)


def sharded_params(shapes: dict, target: str) -> dict:
    m = mesh(target)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s, np.float32, sharding=NamedSharding(m, param_spec(s, dict(m.shape)))
        ),
        shapes,
        is_leaf=_models.is_shape,
    )


def abstract_state(tx: optax.GradientTransformation, params: dict) -> Any:
    """The optimizer state's ShapeDtypeStructs, placed by ``came_optax.state_shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        came_optax.state_shardings(tx, params),
    )


def compile_step(tx: optax.GradientTransformation, params: dict) -> tuple[Any, Any]:
    """The compiled donated step and the optimizer state's ShapeDtypeStructs."""
    state = abstract_state(tx, params)
    shardings = jax.tree.map(lambda x: x.sharding, state)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_shardings, shardings))
        .trace(params, state, params)
        .lower()
        .compile()
    )
    return compiled, state


# Optimized-HLO reading. An instruction is `[ROOT] %name = SHAPE opcode(operands), attributes`;
# an array shape is `dtype[dims]{layout}`, and a layout's `S(n)`, n > 0, puts the buffer in an
# on-chip memory (a TPU's VMEM or SMEM) instead of HBM.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\w*)\[([0-9,]*)\](\{[^}]*\})?")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# Instructions that move no data: they name, group or reinterpret buffers.
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
}  # fmt: skip
# TPU custom calls that only reinterpret on-chip buffers.
_FREE_CUSTOM_CALLS = {"ConcatBitcast"}
# Asynchronous copies between HBM and on-chip memory that XLA's memory-space assignment adds on
# TPU: direct memory transfers, not kernels; `-done` only waits.
_STAGING = {"copy-start", "slice-start"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def arrays(shape: str) -> list[tuple[int, bool]]:
    """``(bytes, in HBM)`` of each array of an HLO shape, tuples flattened in order."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        size = 1 if dtype.startswith("f8") else _DTYPE_BYTES.get(dtype)
        if size is None:  # token[], opaque types
            continue
        space = re.search(r"S\((\d+)\)", layout)
        out.append(
            (size * math.prod(int(d) for d in dims.split(",") if d), not space or space[1] == "0")
        )
    return out


def hbm_bytes(shape: str) -> int:
    return sum(n for n, in_hbm in arrays(shape) if in_hbm)


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def parse_instruction(line: str) -> tuple[str, str, str, list[str], str] | None:
    """``(name, shape, opcode, operand names, attributes)`` of an instruction line, else None."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, rest = match.groups()
    end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"[\w\-]+", rest)
    if opcode is None or rest[opcode.end() : opcode.end() + 1] != "(":
        return None
    close = _closing(rest, opcode.end())
    operands = re.findall(r"%([\w.\-]+)", rest[opcode.end() + 1 : close])
    return name, shape, opcode.group(), operands, rest[close + 1 :]


def _staged_bytes(opcode: str, shape: str, operand_shapes: list[str]) -> int:
    """HBM bytes of an asynchronous copy: its destination's size, once per end in HBM."""
    parts = arrays(shape)
    if opcode == "copy-start":  # (destination, source, context)
        (size, dst_hbm), (_, src_hbm) = parts[0], parts[1]
    else:  # ((operands), destination, context)
        size, dst_hbm = parts[len(operand_shapes)]
        src_hbm = any(in_hbm for s in operand_shapes for _, in_hbm in arrays(s))
    return size * (dst_hbm + src_hbm)


def hlo_summary(hlo: str) -> dict[str, Any]:
    """Kernels, fusions, HBM bytes, conditionals and collectives of an optimized HLO module.

    The HBM bytes are, over the entry computation's kernels, the bytes of their operands and
    results that live in HBM (each distinct operand once); staging copies count the bytes they
    move to or from HBM.
    """
    entry, opcodes, in_entry = [], [], False
    for line in hlo.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
        elif line.startswith("}"):
            in_entry = False
        instruction = parse_instruction(line) if line.startswith(" ") else None
        if instruction is None:
            continue
        opcodes.append(instruction[2])
        if in_entry:
            entry.append(instruction)
    shapes = {name: shape for name, shape, *_ in entry}
    kernels, moved = [], 0
    for _, shape, opcode, operands, attributes in entry:
        target = re.search(r'custom_call_target="([^"]*)"', attributes)
        if (
            opcode in _FREE
            or opcode.endswith("-done")
            or (target and target[1] in _FREE_CUSTOM_CALLS)
        ):
            continue
        if opcode in _STAGING:
            moved += _staged_bytes(opcode, shape, [shapes[o] for o in operands])
            continue
        kernels.append(opcode)
        moved += hbm_bytes(shape) + sum(hbm_bytes(shapes[o]) for o in dict.fromkeys(operands))
    collectives = {c: sum(op in (c, f"{c}-start") for op in opcodes) for c in COLLECTIVES}
    return {
        "kernels": len(kernels),
        "fusions": kernels.count("fusion"),
        "hbm_bytes": moved,
        "conditionals": opcodes.count("conditional"),
        "collectives": {c: n for c, n in collectives.items() if n},
    }


def _model_shapes(model: str | dict) -> dict:
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}; got {model!r}.")
        return MODELS[model]
    return model


def compiled_cost(tx: optax.GradientTransformation, model: str | dict, target: str) -> dict:
    """What one donated optimizer step compiled for ``target`` reads, writes and launches.

    Args:
      tx: the optimizer.
      model: a name in ``MODELS`` or a nested dict of parameter shape tuples (float32).
      target: a name in ``TARGETS``.

    Returns:
      A dict: the model's ``params`` and ``leaves``; ``chips`` and ``params_per_chip``, the
      parameter elements one chip holds (replicas included); ``hbm_bytes``, the HBM bytes the
      per-chip program's kernels read and write (see :func:`hlo_summary`), and
      ``bytes_per_param``, ``hbm_bytes / params_per_chip``; ``xla_bytes_accessed``, XLA's cost
      analysis of the per-chip program (TPU only; the GPU compiler gives none), which also counts
      on-chip (VMEM) traffic; ``kernels``, ``fusions``, ``conditionals``, ``collectives`` (a dict
      by kind), ``temp_bytes`` and ``state_bytes_per_chip``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}; got {target!r}.")
    params = sharded_params(_model_shapes(model), target)
    compiled, state = compile_step(tx, params)
    summary = hlo_summary(compiled.as_text())
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    chips = math.prod(TARGETS[target].mesh)
    held = sum(math.prod(p.sharding.shard_shape(p.shape)) for p in jax.tree.leaves(params))
    return {
        "params": _models.num_params(_model_shapes(model)),
        "params_per_chip": held,
        "leaves": len(jax.tree.leaves(params)),
        "chips": chips,
        "bytes_per_param": summary["hbm_bytes"] / held,
        "xla_bytes_accessed": float(cost["bytes accessed"]) if cost else None,
        **summary,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "state_bytes_per_chip": sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(state)
        ),
    }


def _collectives_cell(collectives: dict[str, int]) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS"}
    return ", ".join(f"{n} {short.get(c, c)}" for c, n in collectives.items()) or "0"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def table(results: dict[str, dict], markdown: bool) -> str:
    header = [
        "optimizer", "B/param", f"vs {BASELINE}", f"XLA bytes vs {BASELINE}", "kernels",
        "per leaf", "fusions", "conditionals", "collectives", "temp MiB", "state MiB/chip",
    ]  # fmt: skip
    base = results.get(BASELINE, {})
    rows = []
    for name, r in results.items():
        rows.append([
            name, f"{r['bytes_per_param']:.1f}", _ratio(r["hbm_bytes"], base.get("hbm_bytes")),
            _ratio(r["xla_bytes_accessed"], base.get("xla_bytes_accessed")), str(r["kernels"]),
            f"{r['kernels'] / r['leaves']:.1f}", str(r["fusions"]), str(r["conditionals"]),
            _collectives_cell(r["collectives"]), f"{r['temp_bytes'] / 2**20:,.1f}",
            f"{r['state_bytes_per_chip'] / 2**20:,.1f}",
        ])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2-4", choices=sorted(MODELS))
    parser.add_argument(
        "--target",
        action="append",
        help=f"repeatable or comma-separated, from {', '.join(TARGETS)} "
        f"(default: {', '.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated from {', '.join(OPTIMIZERS)} (default: all)",
    )
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    names = args.optimizers.split(",")
    if [n for n in names if n not in OPTIMIZERS]:
        parser.error(f"--optimizers: choose from {list(OPTIMIZERS)}; got {names}")
    # The programs are compiled for described chips and never run: the host needs only its CPU.
    jax.config.update("jax_platforms", "cpu")
    targets = [t for arg in args.target or [",".join(DEFAULT_TARGETS)] for t in arg.split(",")]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")

    shapes = MODELS[args.model]
    print(
        f"{args.model}: {_models.num_params(shapes) / 1e6:.1f}M float32 parameters in "
        f"{len(jax.tree.leaves(shapes, is_leaf=_models.is_shape))} leaves; jax {jax.__version__}, "
        f"optax {optax.__version__}\n"
    )
    for target in targets:
        results = {}
        for name in names:
            print(f"compiling {name} for {target} ...", file=sys.stderr, flush=True)
            results[name] = compiled_cost(OPTIMIZERS[name], shapes, target)
        device = mesh(target).devices.flat[0].device_kind
        chips = math.prod(TARGETS[target].mesh)
        layout = f"{chips} chip" if chips == 1 else f"{chips} chips, mesh {TARGETS[target].mesh}"
        print(f"{'### ' if args.markdown else ''}{target}: {device}, {layout}\n")
        print(table(results, args.markdown) + "\n", flush=True)
    print(
        "B/param: HBM bytes read and written per parameter element a chip holds (adamw: 28). "
        "XLA bytes: XLA's cost analysis, which also counts on-chip memory (TPU only). kernels: "
        "top-level device operations of the program, fusions among them."
    )


if __name__ == "__main__":
    main()
