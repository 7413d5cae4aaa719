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

``--search`` asks the question the other way round: per setup, the largest model of a
LLaMA-style family (``FAMILY``: 0.49B to 7.32B parameters, each about 25% larger than the one
before) whose step fits. After the parameters-and-state filter it bisects the family, taking a
larger model's step to need at least a smaller one's HBM, and prints the largest model that
fits with its peak, and the next larger model with what it needs.

Needs libtpu (``pip install -e ".[tpu]"``); skips with a message without it. From the repository
root::

    python benchmarks/fit_tpu.py
    python benchmarks/fit_tpu.py --all --effort 0
    python benchmarks/fit_tpu.py --search
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

# A LLaMA-style family for --search, 0.5B to 7.3B parameters, each about 25% larger than the
# one before: (width, depth, SwiGLU width), the SwiGLU width the smallest multiple of 256 not
# below 8/3 of the width, width / depth between 85 and 130 as in LLaMA-2, Llama-3.2 and
# OpenLLaMA; vocabulary 32000, heads of 128.
FAMILY = [
    (1536, 14, 4096), (1536, 18, 4096), (1792, 17, 4864), (2048, 16, 5632), (2048, 21, 5632),
    (2304, 22, 6144), (2560, 22, 6912), (2560, 28, 6912), (2816, 29, 7680), (3072, 31, 8192),
    (3328, 33, 8960), (3584, 36, 9728), (3840, 40, 10240),
]  # fmt: skip
FAMILY_VOCAB, FAMILY_HEAD_DIM = 32000, 128

# optax.adamw keeps both moments in the parameters' dtype unless mu_dtype says otherwise, so
# with bfloat16 parameters its mu and nu are both bfloat16 (mu_dtype says it for the reader).
SETUPS = {
    "adamw, fp32 params": (optax.adamw(1e-3), jnp.float32),
    "adamw, bf16 params + bf16 moments": (
        optax.adamw(1e-3, mu_dtype=jnp.bfloat16),
        jnp.bfloat16,
    ),
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


def family() -> dict[str, tuple[dict, int]]:
    """``FAMILY`` as ``{name: (shapes, head_dim)}``, smallest first; a name gives the size and
    width x depth."""
    models = {}
    for width, depth, mlp in FAMILY:
        shapes = _models.llama(width, depth, mlp=mlp, vocab=FAMILY_VOCAB)
        name = f"{_models.num_params(shapes) / 1e9:.2f}B ({width} x {depth})"
        models[name] = (shapes, FAMILY_HEAD_DIM)
    return models


def largest_fitting(
    tx: optax.GradientTransformation,
    dtype,
    models: dict[str, tuple[dict, int]],
    sharding: jax.sharding.Sharding,
    effort: float,
) -> tuple[str | None, dict[str, Any] | None, str | None, dict[str, Any] | None]:
    """The largest of ``models`` (smallest first) whose step fits, by bisection.

    A model whose parameters and state alone exceed the HBM is not compiled; among the others
    the search compiles about log2 of their count, taking a larger model's step to need at
    least a smaller one's HBM. Returns the largest model that fits and its ``compile_step``
    result, then the next larger model and its result: ``compile_step``'s, or ``{"bound":
    bytes}`` when it was not compiled (``None, None`` for either end that does not exist).
    """
    names = list(models)
    bounds = [donated_bytes(tx, models[m][0], dtype) for m in names]
    compiled: dict[int, dict[str, Any]] = {}
    fits, fails = -1, next((i for i, b in enumerate(bounds) if b > HBM_BYTES), len(names))
    while fails - fits > 1:
        mid = (fits + fails) // 2
        shapes, head_dim = models[names[mid]]
        print(f"  compiling {names[mid]} ...", file=sys.stderr, flush=True)
        compiled[mid] = compile_step(tx, shapes, dtype, head_dim, sharding, effort)
        verdict = "fits" if compiled[mid]["fits"] else "does not fit"
        print(f"  {compiled[mid]['seconds']:.0f} s: {verdict}", file=sys.stderr, flush=True)
        fits, fails = (mid, fails) if compiled[mid]["fits"] else (fits, mid)
    largest = (names[fits], compiled[fits]) if fits >= 0 else (None, None)
    if fails == len(names):
        return (*largest, None, None)
    return (*largest, names[fails], compiled.get(fails, {"bound": bounds[fails]}))


def search(sharding: jax.sharding.Sharding, effort: float) -> None:
    """Prints, per setup, the largest model of ``family()`` whose step fits, and the next one."""
    models = family()
    print(f"LLaMA-style family: {', '.join(models)}\n")
    rows = []
    for setup, (tx, dtype) in SETUPS.items():
        print(f"{setup}:", file=sys.stderr, flush=True)
        rows.append((setup, *largest_fitting(tx, dtype, models, sharding, effort)))
    print("| setup | largest model that fits | its peak HBM | next larger model | it needs |")
    print("|---|---|---:|---|---:|")
    for setup, largest, fit, larger, refused in rows:
        peak = f"{gib(fit['peak'])} GiB" if fit and fit["peak"] is not None else "n/a"
        if refused is None:
            needs = ""
        elif "bound" in refused:
            needs = f"> {gib(refused['bound'])} GiB (params + state; not compiled)"
        else:
            needs = f"{gib(refused['needed'])} GiB"
        print(f"| {setup} | {largest or 'none'} | {peak} | {larger or '(none)'} | {needs} |")
    print(
        "\nThe largest model whose whole training step XLA compiled within one TPU v5e chip "
        "(peak HBM of its program) and the next larger model (the compiler's figure for the "
        "program it refused); compiled ahead of time, not measured."
    )


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
        "--search",
        action="store_true",
        help="find the largest model of a LLaMA-style family (0.5B to 7.3B) that fits, per setup",
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
    if args.search:
        search(sharding, args.effort)
        return

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
