"""Every linear GEMM of the model goes through ``linear``: one entry point where the precision
recipe is chosen (DeepSeek-V3 report Sec. 3.3 keeps the embedding, output head, router, norms and
the attention core out of it; those call ``jnp.einsum`` directly).

``spec`` is the einsum of the projection, written with the activation first and the weight second
(e.g. ``"btd,dq->btq"``). The weight's contracted letters come first in its spec and its output
letters last, which is what the low-precision recipes flatten into one [K, N] matrix.

recipe:
  "bf16": the compute dtype of ``dtype`` (bfloat16 on accelerators, float32 on CPU): today's path.
"""

import jax
import jax.numpy as jnp

RECIPES = ("bf16",)


def linear(spec: str, x: jax.Array, w: jax.Array, *, dtype, recipe: str = "bf16") -> jax.Array:
    """x [..., K-dims] (spec's first operand) times w [K-dims, N-dims] -> spec's output, in ``dtype``."""
    dt = jnp.dtype(dtype)
    if recipe == "bf16":
        return jnp.einsum(spec, x.astype(dt), w.astype(dt))
    raise ValueError(f"linear: recipe must be one of {RECIPES}, got {recipe!r}")
