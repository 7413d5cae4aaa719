"""Parameter shapes of the models the benchmarks use, named as in a Flax model.

A model is a nested dict whose leaves are shape tuples; ``abstract`` turns it
into ``jax.ShapeDtypeStruct`` leaves. Nothing here allocates memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024
# GPT-2's vocabulary padded to a multiple of 64, as nanoGPT trains it; it divides any mesh axis
# up to 64.
GPT2_PADDED_VOCAB = 50304
VIT_PATCH, VIT_IMAGE, VIT_CLASSES = 16, 224, 1000


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


def gpt2(width: int, depth: int, vocab: int = GPT2_VOCAB, context: int = GPT2_CONTEXT) -> dict:
    """GPT-2 with the output projection tied to the token embedding."""
    return {
        "wte": (vocab, width),
        "wpe": (context, width),
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


def llama(width: int, depth: int, mlp: int, vocab: int) -> dict:
    """A LLaMA-style decoder: RMSNorm scales, bias-free q/k/v/o and gate/up/down, untied head.

    Every attention projection is ``(width, width)`` (as many key/value heads as query heads).
    """
    square = {"kernel": (width, width)}
    return {
        "embed": (vocab, width),
        "layers": [
            {
                "attn_norm": {"scale": (width,)},
                "attn": {"q": square, "k": square, "v": square, "o": square},
                "mlp_norm": {"scale": (width,)},
                "mlp": {
                    "gate": {"kernel": (width, mlp)},
                    "up": {"kernel": (width, mlp)},
                    "down": {"kernel": (mlp, width)},
                },
            }
            for _ in range(depth)
        ],
        "norm": {"scale": (width,)},
        "lm_head": {"kernel": (width, vocab)},
    }


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def abstract(shapes: dict, dtype=jnp.float32) -> dict:
    """``ShapeDtypeStruct`` leaves of ``dtype`` in place of shape tuples."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def num_params(shapes: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(abstract(shapes)))
