"""Every linear GEMM of the model goes through ``linear``: one entry point where the precision
recipe is chosen (DeepSeek-V3 report Sec. 3.3 keeps the embedding, output head, router, norms and
the attention core out of it; those call ``jnp.einsum`` directly).

``spec`` is the einsum of the projection, written with the activation first and the weight second
(e.g. ``"btd,dq->btq"``). The weight's contracted letters come first in its spec and its output
letters last, which is what the low-precision recipes flatten into one [K, N] matrix.

recipe (``ModelConfig.gemm_recipe``; ``RECIPES`` is the one vocabulary, validated there):
  "bf16": the compute dtype of ``dtype`` (bfloat16 on accelerators, float32 on CPU): today's path.
  "fp8":  DeepSeek-V3's fine-grained FP8 (Sec. 3.3.1-3.3.2): all three products (fprop, dgrad,
          wgrad) in float8_e4m3fn with one scale per 1x128 activation / gradient tile and per
          128x128 weight block, f32 accumulation promoted every 128 along K
          (``kernels_pallas.fp8.fp8_matmul``: Pallas on TPU, the XLA reference elsewhere). Output
          in ``dtype``; the weight gradient in the weight's dtype (f32 master weights).
  "int8": the same granularity in int8 (qmax 127), for MXUs with int8 but no FP8.
Dimensions that are not multiples of 128 (MLA's kv_lora_rank + rope dims, tiny test models) are
zero-padded inside the op: the result equals the unpadded recipe's, so every layer shape works.

``w`` may also be a ``QuantizedWeight`` (already quantized, e.g. DeepSeek's FP8 checkpoint kept as
e4m3 + 128x128 ``weight_scale_inv``): under "fp8"/"int8" it is used as is (inference: no gradient
flows to it); under "bf16" it is dequantized first.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.fp8 import fp8_matmul
from kernels_pallas.fp8 import reference as fp8_reference
from kernels_pallas.fp8.ops import quantize_activations, scaled_matmul

RECIPES = ("bf16", "fp8", "int8")


class QuantizedWeight(NamedTuple):
    """A weight already quantized in 128x128 blocks of its [K, N] flattening: ``q`` has the weight's
    shape (K letters first, N letters last, as in ``linear``'s spec), dtype float8_e4m3fn or int8;
    ``scale`` [K/128, N/128] f32 with K, N rounded up (DeepSeek's ``weight_scale_inv``: w = q * scale)."""

    q: jax.Array
    scale: jax.Array


def dequantize(w: QuantizedWeight, n_dims: int, dtype=jnp.float32) -> jax.Array:
    """The weight q * scale in ``dtype``; ``n_dims``: how many trailing axes of q are output axes."""
    shape = w.q.shape
    q2 = w.q.reshape(_prod(shape[: len(shape) - n_dims]), -1)  # [K, N]
    s = jnp.repeat(jnp.repeat(w.scale, fp8_reference.BLOCK, 0), fp8_reference.BLOCK, 1)[: q2.shape[0], : q2.shape[1]]
    return (q2.astype(jnp.float32) * s).reshape(shape).astype(dtype)


def _split(spec: str):
    """ "bhtv,hvd->btd" -> ("bhtv", "hv", "d", "btd"); refuses a spec that does not flatten."""
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    k = "".join(c for c in ws if c in xs)
    n = ws[len(k) :]
    if ws != k + n or any(c in xs for c in n) or "." in ws:
        raise ValueError(f"linear: weight spec must list its contracted letters, then its output ones: {spec!r}")
    return xs, k, n, out


def linear(spec: str, x: jax.Array, w, *, dtype, recipe: str = "bf16") -> jax.Array:
    """x [..., K-dims] (spec's first operand) times w [K-dims, N-dims] -> spec's output, in ``dtype``."""
    dt = jnp.dtype(dtype)
    if recipe not in RECIPES:
        raise ValueError(f"linear: recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "bf16":
        if isinstance(w, QuantizedWeight):
            w = dequantize(w, len(_split(spec)[2]), dt)
        return jnp.einsum(spec, x.astype(dt), w.astype(dt))
    xs, k, n, out = _split(spec)
    batch = "".join(c for c in xs if c not in k)  # may hold "..."
    xt = jnp.einsum(f"{xs}->{batch}{k}", x.astype(dt))  # contracted axes last, in w's order
    lead = xt.shape[: xt.ndim - len(k)]
    x2 = xt.reshape(-1, _prod(xt.shape[xt.ndim - len(k) :]))  # [M, K]
    wq = w.q if isinstance(w, QuantizedWeight) else w
    n_shape = wq.shape[len(k) :]
    if isinstance(w, QuantizedWeight):
        y2 = _prequantized(x2, w, recipe, dt)
    else:
        y2 = fp8_matmul(x2, w.reshape(x2.shape[1], -1), fmt=recipe, out_dtype=dt)  # [M, N]
    y = y2.reshape(lead + n_shape)
    return jnp.einsum(f"{batch}{n}->{out}", y)


def _prod(shape) -> int:
    p = 1
    for d in shape:
        p *= d
    return p


def _prequantized(x2, w: QuantizedWeight, recipe: str, dt):
    """x2 [M, K] times a kept-quantized weight (forward only): x per 1x128 tile, w's own blocks."""
    kk = x2.shape[1]
    w2 = w.q.reshape(kk, -1)  # [K, N]
    n = w2.shape[1]
    pk, pn = -kk % fp8_reference.BLOCK, -n % fp8_reference.BLOCK
    x_q, x_scale = quantize_activations(jnp.pad(x2, ((0, 0), (0, pk))), fmt=recipe)  # [M, Kp], [M, Kp/128]
    y = scaled_matmul(x_q, x_scale, jnp.pad(w2, ((0, pk), (0, pn))), w.scale, out_dtype=dt)  # [M, Np]
    return y[:, :n]
