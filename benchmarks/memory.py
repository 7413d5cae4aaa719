"""Optimizer-state memory of CAME, AdamW and Adafactor on GPT-2 and ViT shapes.

Nothing is allocated: the parameters are ``jax.ShapeDtypeStruct`` leaves and each
optimizer's state shapes come from ``jax.eval_shape(tx.init, params)``. Prints a
markdown table of state bytes and their ratio to ``optax.adamw``'s.

Run from the repository root:

    python benchmarks/memory.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import came_optax

# Config: the models (float32 parameters) and the optimizers compared.
GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024
VIT_PATCH, VIT_IMAGE, VIT_CLASSES = 16, 224, 1000

OPTIMIZERS = {
    "came": came_optax.came(1e-4),
    "came, bf16 mu": came_optax.came(1e-4, mu_dtype=jnp.bfloat16),
    "adamw": optax.adamw(1e-3),
    "adafactor": optax.adafactor(1e-3),
}


# Parameter shapes, named as in a Flax model.
def dense(n_in: int, n_out: int) -> dict:
    return {"kernel": (n_in, n_out), "bias": (n_out,)}


def layer_norm(width: int) -> dict:
    return {"scale": (width,), "bias": (width,)}


def block(width: int) -> dict:
    """A pre-LN transformer block with fused QKV and a 4x MLP (GPT-2 and ViT)."""
    return {
        "ln_1": layer_norm(width),
        "attn": {"qkv": dense(width, 3 * width), "out": dense(width, width)},
        "ln_2": layer_norm(width),
        "mlp": {"fc": dense(width, 4 * width), "proj": dense(4 * width, width)},
    }


def gpt2(width: int, depth: int) -> dict:
    """GPT-2 with the output projection tied to the token embedding."""
    return {
        "wte": (GPT2_VOCAB, width),
        "wpe": (GPT2_CONTEXT, width),
        "blocks": [block(width) for _ in range(depth)],
        "ln_f": layer_norm(width),
    }


def vit(width: int, depth: int) -> dict:
    """ViT with a class token, learned position embeddings and a linear head."""
    tokens = (VIT_IMAGE // VIT_PATCH) ** 2 + 1
    return {
        "patch": {"kernel": (VIT_PATCH, VIT_PATCH, 3, width), "bias": (width,)},
        "cls": (1, 1, width),
        "pos": (1, tokens, width),
        "blocks": [block(width) for _ in range(depth)],
        "ln_f": layer_norm(width),
        "head": dense(width, VIT_CLASSES),
    }


MODELS = {
    "GPT-2 small": gpt2(768, 12),
    "GPT-2 medium": gpt2(1024, 24),
    "ViT-B/16": vit(768, 12),
}


def abstract(shapes: dict) -> dict:
    """Float32 ``ShapeDtypeStruct`` leaves in place of shape tuples."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


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
        params = abstract(shapes)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        sizes = {name: state_bytes(tx, params) for name, tx in OPTIMIZERS.items()}
        cells = [f"{mib(b)} ({b / sizes['adamw']:.3f}x)" for b in sizes.values()]
        print(f"| {model} | {n_params / 1e6:.1f}M | " + " | ".join(cells) + " |")
    print("\nState bytes (float32 parameters), with the ratio to optax.adamw's.")


if __name__ == "__main__":
    main()
