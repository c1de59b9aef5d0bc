"""RMSNorm (Zhang & Sennrich 2019), computed in float32 as DeepSeek's reference code does."""

import jax
import jax.numpy as jnp
from flax import nnx

from model.params import param


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, with the statistics in f32 and the result cast back."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axes=("norm",)):
        self.eps = eps
        self.scale = param(jax.nn.initializers.ones, (dim,), param_dtype, axes, rngs=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
