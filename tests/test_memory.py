"""CAME's optimizer state is about half of AdamW's (a quarter with a bfloat16 momentum)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import came_optax

# GPT-2 small (tied embeddings) as {shape: number of leaves of that shape}.
GPT2_SMALL = {
    (50257, 768): 1,  # token embedding, also the output projection
    (1024, 768): 1,  # position embedding
    (768, 2304): 12,  # fused QKV kernels
    (768, 768): 12,  # attention output kernels
    (768, 3072): 12,  # MLP input kernels
    (3072, 768): 12,  # MLP output kernels
    (2304,): 12,
    (3072,): 12,
    (768,): 12 * 6 + 2,  # per layer two LayerNorms and two biases; the final LayerNorm
}


def gpt2_small_params() -> list[jax.ShapeDtypeStruct]:
    return [
        jax.ShapeDtypeStruct(shape, jnp.float32)
        for shape, count in GPT2_SMALL.items()
        for _ in range(count)
    ]


def state_bytes(tx: optax.GradientTransformation, params) -> int:
    state = jax.eval_shape(tx.init, params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_gpt2_small_shapes_have_124m_params():
    assert sum(x.size for x in gpt2_small_params()) == 124_439_808


@pytest.mark.parametrize(
    "mu_dtype, max_ratio", [(None, 0.505), (jnp.bfloat16, 0.255)], ids=["float32", "bfloat16"]
)
def test_came_state_vs_adamw_on_gpt2_small(mu_dtype, max_ratio):
    params = gpt2_small_params()
    came = state_bytes(came_optax.came(1e-4, mu_dtype=mu_dtype), params)
    adamw = state_bytes(optax.adamw(1e-3), params)
    assert came <= max_ratio * adamw, f"came/adamw = {came / adamw:.4f} > {max_ratio}"
