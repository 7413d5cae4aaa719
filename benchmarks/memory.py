"""Optimizer-state memory of CAME, AdamW and Adafactor on GPT-2 and ViT shapes.

Nothing is allocated: the parameters are ``jax.ShapeDtypeStruct`` leaves and each
optimizer's state shapes come from ``jax.eval_shape(tx.init, params)``. Prints a
markdown table of state bytes and their ratio to ``optax.adamw``'s, then one of
parameter plus state bytes per parameter for float32 and bfloat16 parameters (the
latter trained with stochastic rounding, whose state is one step count).

Run from the repository root:

    python benchmarks/memory.py
"""

from __future__ import annotations

import _models
import jax
import jax.numpy as jnp
import optax

import came_optax

# Config: the models (float32 parameters) and the optimizers compared.
OPTIMIZERS = {
    "came": came_optax.came(1e-4),
    "came, bf16 mu": came_optax.came(1e-4, mu_dtype=jnp.bfloat16),
    "came, int8 mu": came_optax.came(1e-4, mu_dtype="int8"),
    "adamw": optax.adamw(1e-3),
    "adafactor": optax.adafactor(1e-3),
}

# (optimizer, parameter dtype) setups of the second table.
SETUPS = {
    "adamw, fp32 params": (optax.adamw(1e-3), jnp.float32),
    "came, fp32 params": (came_optax.came(1e-4), jnp.float32),
    "came int8 mu, fp32 params": (came_optax.came(1e-4, mu_dtype="int8"), jnp.float32),
    "came int8 mu, bf16 params + SR": (
        came_optax.came(1e-4, mu_dtype="int8", stochastic_rounding=True),
        jnp.bfloat16,
    ),
}

MODELS = {
    "GPT-2 small": _models.gpt2(768, 12),
    "GPT-2 medium": _models.gpt2(1024, 24),
    "ViT-B/16": _models.vit(768, 12),
}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes(tx: optax.GradientTransformation, params) -> int:
    return nbytes(jax.eval_shape(tx.init, params))


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    names = list(OPTIMIZERS)
    print("| model | params | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for model, shapes in MODELS.items():
        params = _models.abstract(shapes)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        sizes = {name: state_bytes(tx, params) for name, tx in OPTIMIZERS.items()}
        cells = [f"{mib(b)} ({b / sizes['adamw']:.3f}x)" for b in sizes.values()]
        print(f"| {model} | {n_params / 1e6:.1f}M | " + " | ".join(cells) + " |")
    print("\nState bytes (float32 parameters), with the ratio to optax.adamw's.\n")

    names = list(SETUPS)
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for model, shapes in MODELS.items():
        cells = []
        for tx, dtype in SETUPS.values():
            params = _models.abstract(shapes, dtype)
            total = nbytes(params) + state_bytes(tx, params)
            cells.append(f"{total / sum(x.size for x in jax.tree.leaves(params)):.2f} B")
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("\nParameter plus optimizer-state bytes per parameter (no gradients or activations).")


if __name__ == "__main__":
    main()
