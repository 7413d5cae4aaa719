"""Which models' whole training step fits in the HBM of one TPU v5e chip, compiled ahead of time.

For each model and optimizer setup, XLA compiles for one described TPU v5e chip (libtpu's
topologies; no TPU needed) the donated training step

    loss, grads = jax.value_and_grad(causal_lm_loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

with the forward of ``benchmarks/_models.py`` (blocks unrolled, each under ``jax.checkpoint``;
matrix products in bfloat16 in every setup, norms and the loss in float32) on one batch of 4
sequences of 1024 positions (``BATCH``, ``SEQ_LEN``); ViT-B/16, not a language model, is left
out. The parameters and the state are donated, so their outputs alias their inputs. **fits** is
the TPU compiler's verdict: it refuses a program whose peak exceeds the HBM it can allocate on
the chip (15.75 of the v5e's 16 GiB) and says how much the program needs, which is shown in its
place. For a program that fits, ``memory_analysis()`` gives its peak HBM use and its argument +
output + temporary - aliased bytes. These are **compiled sizes, not measurements** on a chip.

A model whose parameters and optimizer state alone exceed 16 GiB is not compiled: they are in
HBM from the start of the step to its end. By default each setup's other models are compiled
from the largest down and the first that fits ends the setup (smaller rows say so); ``--all``
compiles them all. The programs are compiled with XLA's lowest execution-time optimization
effort (``--effort``, default -1), which takes the 1.6B model's compile from about three
minutes to about two on two busy CPU cores; ``--effort 0`` compiles as ``jax.jit`` does by
default.

Needs libtpu (``pip install -e ".[tpu]"``); skips with a message without it. From the repository
root::

    python benchmarks/fit_tpu.py
    python benchmarks/fit_tpu.py --all --effort 0
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from typing import Any

import _models
import accelerators
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

import came_optax

# Config: the chip, the batch, the models (with their attention head width) and the setups.
TARGET = "tpu-v5e-1"  # a name in accelerators.TARGETS
HBM_BYTES = 16 * 2**30
BATCH, SEQ_LEN = 4, 1024

MODELS = {
    "GPT-2 small": (_models.gpt2(768, 12), 64),
    "GPT-2 medium": (_models.gpt2(1024, 24), 64),
    # Llama-3.2-1B's widths with full-width k/v and an untied head (1.6B), and LLaMA-7B's.
    "LLaMA-style 1B": (_models.llama(2048, 16, mlp=8192, vocab=128256), 64),
    "LLaMA-style 7B": (_models.llama(4096, 32, mlp=11008, vocab=32000), 128),
}

SETUPS = {
    "adamw, fp32 params": (optax.adamw(1e-3), jnp.float32),
    "came, fp32 params": (came_optax.came(1e-4), jnp.float32),
    "came int8 mu, bf16 params + SR": (
        came_optax.came(1e-4, mu_dtype="int8", stochastic_rounding=True),
        jnp.bfloat16,
    ),
}

# What libtpu says when a program does not fit, e.g. "the total memory required for HLO
# temporaries (16.99G) exceeds available HBM (15.75G)".
_OUT_OF_HBM = re.compile(r"required[^(]*\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)G\)")


def train_step(tx: optax.GradientTransformation, head_dim: int):
    """``step(params, state, tokens) -> (params, state, loss)``: one causal-LM training step."""
    loss_fn = jax.value_and_grad(lambda p, t: _models.causal_lm_loss(p, t, head_dim=head_dim))

    def step(params, state, tokens):
        loss, grads = loss_fn(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def donated_bytes(tx: optax.GradientTransformation, shapes: dict, dtype) -> int:
    """Bytes of parameters and optimizer state: the step holds them from start to end."""
    params = _models.abstract(shapes, dtype)
    state = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, state)))


def compile_step(
    tx: optax.GradientTransformation,
    shapes: dict,
    dtype,
    head_dim: int,
    sharding: jax.sharding.Sharding,
    effort: float = -1.0,
    batch: int = BATCH,
    seq_len: int = SEQ_LEN,
) -> dict[str, Any]:
    """Compiles the donated training step for ``sharding``'s devices and reads its memory.

    Returns ``fits`` (whether the compiler accepted the program), ``seconds`` (to lower and
    compile) and, when it fits, ``peak``, ``total`` (argument + output + temp - alias),
    ``argument``, ``temp`` and ``alias`` bytes; when it does not, ``needed``, the bytes the
    compiler said the program needs, and ``available``. Raises what the compiler raises for
    any other failure.
    """

    def placed(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = jax.tree.map(placed, _models.abstract(shapes, dtype))
    state = jax.tree.map(placed, jax.eval_shape(tx.init, params))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=sharding)
    start = time.perf_counter()
    lowered = jax.jit(train_step(tx, head_dim), donate_argnums=(0, 1)).trace(params, state, tokens)
    try:
        options = {"exec_time_optimization_effort": effort}
        compiled = lowered.lower().compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:  # libtpu's RESOURCE_EXHAUSTED
        match = _OUT_OF_HBM.search(str(e))
        if match is None:
            raise
        scale = 2 ** (10 * ("KMGT".index(match[2]) + 1))
        return {
            "fits": False,
            "seconds": time.perf_counter() - start,
            "needed": float(match[1]) * scale,
            "available": float(match[3]) * 2**30,
        }
    memory = compiled.memory_analysis()
    out = {
        "fits": True,
        "seconds": time.perf_counter() - start,
        "argument": memory.argument_size_in_bytes,
        "temp": memory.temp_size_in_bytes,
        "alias": memory.alias_size_in_bytes,
        "total": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes,
    }
    out["peak"] = getattr(memory, "peak_memory_in_bytes", None)
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def cell(result: dict[str, Any]) -> str:
    """A table cell: the verdict, with the peak (and the sum) or why the row was not compiled."""
    if "smaller_than" in result:
        return f"yes (not compiled: {result['smaller_than']} fits)"
    if "bound" in result:
        return f"no (not compiled: params + state {gib(result['bound'])} GiB)"
    if not result["fits"]:
        return f"no: needs {gib(result['needed'])} GiB"
    peak = gib(result["peak"]) if result["peak"] is not None else "n/a"
    return f"yes: {peak} GiB ({gib(result['total'])})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--all", action="store_true", help="also compile the models smaller than one that fits"
    )
    parser.add_argument(
        "--effort",
        type=float,
        default=-1.0,
        help="XLA's exec_time_optimization_effort, from -1 (fastest compile) to 1 (default -1)",
    )
    args = parser.parse_args()
    if not -1.0 <= args.effort <= 1.0:
        parser.error(f"--effort must be in [-1, 1]; got {args.effort}")
    if importlib.util.find_spec("libtpu") is None:
        print("skipped: compiling for a TPU v5e needs libtpu: pip install -e '.[tpu]'")
        return
    # The programs are compiled for a described chip and never run: the host needs its CPU only.
    jax.config.update("jax_platforms", "cpu")
    mesh = accelerators.mesh(TARGET)
    sharding = NamedSharding(mesh, PartitionSpec())
    print(
        f"{mesh.devices.flat[0].device_kind}, 1 chip ({HBM_BYTES / 2**30:.0f} GiB HBM); batch "
        f"{BATCH} x {SEQ_LEN} positions; jax {jax.__version__}, optax {optax.__version__}, "
        f"exec_time_optimization_effort {args.effort:g}\n"
    )

    by_size = sorted(MODELS, key=lambda m: -_models.num_params(MODELS[m][0]))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    largest: dict[str, str] = {}
    for setup, (tx, dtype) in SETUPS.items():
        for model in by_size:
            shapes, head_dim = MODELS[model]
            if setup in largest and not args.all:
                results[model, setup] = {"smaller_than": largest[setup]}
                continue
            bound = donated_bytes(tx, shapes, dtype)
            if bound > HBM_BYTES:
                results[model, setup] = {"bound": bound}
                continue
            print(f"compiling {model}, {setup} ...", file=sys.stderr, flush=True)
            result = compile_step(tx, shapes, dtype, head_dim, sharding, args.effort)
            print(f"  {result['seconds']:.0f} s", file=sys.stderr, flush=True)
            results[model, setup] = result
            if result["fits"]:
                largest.setdefault(setup, model)

    print("| model | params | " + " | ".join(SETUPS) + " |")
    print("|---|---:|" + "---:|" * len(SETUPS))
    for model, (shapes, _) in MODELS.items():
        cells = [cell(results[model, setup]) for setup in SETUPS]
        print(f"| {model} | {_models.num_params(shapes) / 1e6:,.1f}M | " + " | ".join(cells) + " |")
    print(
        "\nWhether the training step fits in one TPU v5e chip, with its peak HBM (and argument "
        "+ output + temp - alias) in GiB, compiled ahead of time, not measured; 'needs' is the "
        "compiler's figure for a program it refused.\n"
    )
    print(
        "largest model that fits: "
        + ", ".join(f"{setup} = {largest.get(setup, 'none')}" for setup in SETUPS)
    )


if __name__ == "__main__":
    main()
