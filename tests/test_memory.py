"""CAME's optimizer state is about half of AdamW's (a quarter with a bfloat16 momentum)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import gpt2_small, state_bytes

import came_optax

GPT2_SMALL_PARAMS = 124_439_808  # GPT-2 small with the output projection tied


def came_state_bytes_oracle(params, mu_itemsize: int) -> int:
    """The step count, the momentum, and per leaf its second-moment and instability statistics.

    A matrix keeps a row and a column mean of each (a placeholder of one float for its full
    second moment); a vector keeps its full second moment (a placeholder of one float for
    each of the four means). A momentum that is not int8 keeps a one-float placeholder for
    its block scales.
    """
    total = 4  # the int32 step count
    for x in jax.tree.leaves(params):
        total += x.size * mu_itemsize + 4
        if x.ndim >= 2:
            rows, cols = x.shape[-2:]
            total += 4 * (2 * rows + 2 * cols + 1)
        else:
            total += 4 * (x.size + 4)
    return total


@pytest.mark.parametrize(
    "mu_dtype, max_ratio", [(None, 0.505), (jnp.bfloat16, 0.255)], ids=["float32", "bfloat16"]
)
def test_came_state_on_gpt2_small_is_momentum_plus_factored_statistics(mu_dtype, max_ratio):
    params = gpt2_small()
    assert sum(x.size for x in jax.tree.leaves(params)) == GPT2_SMALL_PARAMS
    came = state_bytes(came_optax.came(1e-4, mu_dtype=mu_dtype), params)
    mu_itemsize = jnp.dtype(mu_dtype or jnp.float32).itemsize
    assert came == came_state_bytes_oracle(params, mu_itemsize)
    adamw = state_bytes(optax.adamw(1e-3), params)
    assert adamw == 4 + 2 * 4 * GPT2_SMALL_PARAMS
    assert came <= max_ratio * adamw, f"came/adamw = {came / adamw:.4f} > {max_ratio}"
