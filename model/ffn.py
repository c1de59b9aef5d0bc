"""SwiGLU feed-forward (Shazeer 2020): out = (silu(x W_gate) * (x W_up)) W_down.

Used for the first ``first_k_dense`` blocks and for the shared experts of DeepSeekMoE (the
``n_shared_experts`` shared experts are one SwiGLU of width n_shared * moe_ffn_dim, exactly as
DeepSeek's reference code fuses them).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.linear import linear
from model.params import linear_param


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, param_dtype, dtype, rngs: nnx.Rngs, recipe: str = "bf16"):
        self.dtype = jnp.dtype(dtype)
        self.recipe = recipe  # model/linear.py RECIPES (ModelConfig.gemm_recipe)
        self.w_gate = linear_param((d_model, hidden), d_model, param_dtype, ("embed", "mlp"), rngs=rngs)
        self.w_up = linear_param((d_model, hidden), d_model, param_dtype, ("embed", "mlp"), rngs=rngs)
        self.w_down = linear_param((hidden, d_model), hidden, param_dtype, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., d]."""
        dt, rc = self.dtype, self.recipe
        g = linear("...d,df->...f", x, self.w_gate[...], dtype=dt, recipe=rc)
        u = linear("...d,df->...f", x, self.w_up[...], dtype=dt, recipe=rc)
        return linear("...f,fd->...d", jax.nn.silu(g) * u, self.w_down[...], dtype=dt, recipe=rc)
