"""Parameter shapes of the models the benchmarks use, named as in a Flax model, and their forward.

A model is a nested dict whose leaves are shape tuples; ``abstract`` turns it
into ``jax.ShapeDtypeStruct`` leaves (nothing allocated). ``logits`` and
``causal_lm_loss`` run the GPT-2 and LLaMA-style decoders on such trees of arrays.
"""

from __future__ import annotations

import functools

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


def stacked(shapes: dict) -> dict:
    """``shapes`` with its blocks stacked: one block whose leaves have a leading layer axis.

    A model that runs its layers under ``jax.lax.scan`` stores them so; :func:`logits` scans
    such blocks.
    """
    key = "blocks" if "blocks" in shapes else "layers"
    layers = shapes[key]
    return {
        **shapes,
        key: jax.tree.map(lambda s: (len(layers), *s), layers[0], is_leaf=is_shape),
    }


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def abstract(shapes: dict, dtype=jnp.float32) -> dict:
    """``ShapeDtypeStruct`` leaves of ``dtype`` in place of shape tuples."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def num_params(shapes: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(abstract(shapes)))


# A forward pass in plain jax over these parameter trees (list of blocks or ``stacked``), for
# training steps that are timed or compiled ahead of time.


def _layer_norm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def _rms_norm(x: jax.Array, p: dict, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * p["scale"]
    return y.astype(x.dtype)


def _heads(x: jax.Array, head_dim: int) -> jax.Array:
    """``(batch, time, width)`` as ``(batch, time, width // head_dim, head_dim)``."""
    return x.reshape(*x.shape[:2], x.shape[2] // head_dim, head_dim)


def _rope(x: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding of ``(batch, time, heads, head_dim)`` queries or keys."""
    time, head_dim = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle = jnp.arange(time, dtype=jnp.float32)[:, None] * inv_freq
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention of ``(batch, time, heads, head_dim)`` queries, keys and values."""
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return out.reshape(*out.shape[:2], -1)


def _gpt2_block(x: jax.Array, p: dict, head_dim: int, dtype) -> jax.Array:
    def dense(h, layer):
        return h @ layer["kernel"].astype(dtype) + layer["bias"].astype(dtype)

    qkv = jnp.split(dense(_layer_norm(x, p["ln_1"]), p["attn"]["qkv"]), 3, axis=-1)
    x = x + dense(_attention(*(_heads(a, head_dim) for a in qkv)), p["attn"]["out"])
    h = jax.nn.gelu(dense(_layer_norm(x, p["ln_2"]), p["mlp"]["fc"]))
    return x + dense(h, p["mlp"]["proj"])


def _llama_block(x: jax.Array, p: dict, head_dim: int, dtype) -> jax.Array:
    def proj(h, layer):
        return h @ layer["kernel"].astype(dtype)

    h, attn = _rms_norm(x, p["attn_norm"]), p["attn"]
    q, k = (_rope(_heads(proj(h, attn[name]), head_dim)) for name in ("q", "k"))
    x = x + proj(_attention(q, k, _heads(proj(h, attn["v"]), head_dim)), attn["o"])
    h, mlp = _rms_norm(x, p["mlp_norm"]), p["mlp"]
    return x + proj(jax.nn.silu(proj(h, mlp["gate"])) * proj(h, mlp["up"]), mlp["down"])


def logits(
    params: dict,
    tokens: jax.Array,
    *,
    head_dim: int = 64,
    dtype=jnp.bfloat16,
    remat: bool = True,
) -> jax.Array:
    """Next-token logits, float32 ``(batch, time, vocab)``, of a ``gpt2`` or ``llama`` decoder.

    GPT-2: learned positions, pre-LayerNorm blocks with GELU, the token embedding as the output
    head. LLaMA-style: rotary positions, RMSNorm, a SwiGLU MLP and its own head. Attention is
    causal with ``width // head_dim`` heads. Matrix products run in ``dtype`` (float32
    parameters are cast where they are used, as mixed-precision training does), norms and the
    logits in float32. ``remat`` wraps each block in ``jax.checkpoint``: the backward pass keeps
    one activation per block and recomputes the rest. Blocks given as a list are unrolled;
    ``stacked`` blocks run under ``jax.lax.scan``.

    Args:
      params: a ``gpt2`` or ``llama`` tree of arrays (float32 or bfloat16).
      tokens: int ``(batch, time)``; ``time`` is at most a GPT-2's context.
      head_dim: the width of one attention head.
      dtype: the dtype of the matrix products and the activations between blocks.
      remat: whether to recompute each block in the backward pass.
    """
    gpt2_like = "wte" in params
    block = functools.partial(
        _gpt2_block if gpt2_like else _llama_block, head_dim=head_dim, dtype=dtype
    )
    if remat:
        block = jax.checkpoint(block)
    if gpt2_like:
        x = params["wte"][tokens] + params["wpe"][: tokens.shape[1]]
        blocks, final, norm, head = params["blocks"], params["ln_f"], _layer_norm, params["wte"].T
    else:
        x = params["embed"][tokens]
        blocks, final, norm = params["layers"], params["norm"], _rms_norm
        head = params["lm_head"]["kernel"]
    x = x.astype(dtype)
    if isinstance(blocks, dict):  # stacked along a leading layer axis
        x, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, blocks)
    else:
        for p in blocks:
            x = block(x, p)
    return (norm(x, final) @ head.astype(dtype)).astype(jnp.float32)


def causal_lm_loss(params: dict, tokens: jax.Array, **kwargs) -> jax.Array:
    r"""Mean next-token cross-entropy of ``tokens``, int ``(batch, time)``.

    :math:`-\frac{1}{B(T-1)} \sum_{b} \sum_{t<T} \log \mathrm{softmax}(z_{b,t})[x_{b,t+1}]`,
    with :math:`z` the logits of ``tokens[:, :-1]``; ``kwargs`` go to :func:`logits`.
    """
    logp = jax.nn.log_softmax(logits(params, tokens[:, :-1], **kwargs))
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
