"""Plain-jnp fine-grained quantization and block-scaled matmuls (test oracles).

DeepSeek-V3 report, Sec. 3.3.1-3.3.2: activations are scaled per 1x128 tile (one token, 128
channels), weights per 128x128 block, scale = amax / qmax with qmax = 448 (float8_e4m3fn) or 127
(int8); the matmul accumulates each 128-deep K block's partial product in f32 after applying the
two scales ("promotion to CUDA cores" every 128 elements of K).
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

QUANT_FORMATS = {"fp8": (jnp.float8_e4m3fn, 448.0), "int8": (jnp.int8, 127.0)}
BLOCK = 128


_TINY = np.float32(np.finfo(np.float32).tiny)


def compute_scale(amax, qmax: float, pow2_scale: bool):
    """scale = amax / qmax, 1 where amax == 0, optionally rounded up to a power of two.

    Written as amax * f32(1 / qmax), which is what XLA turns the division by a constant into under
    jit anyway; spelling it out keeps kernel and reference bitwise equal. The power-of-two rounding
    works on the bits (exp2(ceil(log2(s))) is not exact on XLA:CPU): adding 2^23 - 1 carries any
    nonzero mantissa into the exponent, then the mantissa is cleared.
    """
    # At least the smallest normal f32: amax / qmax below it is subnormal, which XLA:CPU flushes to
    # zero, and the tile divided by a zero scale turned its zeros into NaN (a training run's
    # gradients went NaN at step 116; tests/kernels_pallas/test_fp8.py).
    scale = jnp.where(amax > 0, jnp.maximum(amax * np.float32(1.0 / qmax), _TINY), 1.0).astype(jnp.float32)
    if not pow2_scale:
        return scale
    bits = lax.bitcast_convert_type(scale, jnp.int32)
    return lax.bitcast_convert_type((bits + 0x7FFFFF) & ~0x7FFFFF, jnp.float32)


def cast_scaled(y, fmt: str):
    """Values already divided by their scale -> the quantized dtype (round to nearest, clipped)."""
    dtype, qmax = QUANT_FORMATS[fmt]
    if fmt == "int8":
        y = jnp.round(y)
    return jnp.clip(y, -qmax, qmax).astype(dtype)


def quantize_reference(x, tile_rows: int, fmt: str = "fp8", pow2_scale: bool = False):
    """x [r, c] -> (q [r, c], scale [r / tile_rows, c / 128] f32); tiles are tile_rows x 128."""
    r, c = x.shape
    t = x.astype(jnp.float32).reshape(r // tile_rows, tile_rows, c // BLOCK, BLOCK)  # [R, tr, C, 128]
    amax = jnp.max(jnp.abs(t), axis=(1, 3), keepdims=True)  # [R, 1, C, 1]
    scale = compute_scale(amax, QUANT_FORMATS[fmt][1], pow2_scale)
    q = cast_scaled(t / scale, fmt).reshape(r, c)
    return q, scale[:, 0, :, 0]


def dequantize_reference(q, scale, tile_rows: int):
    """Inverse of quantize_reference up to rounding: q [r, c] * expanded scale -> f32 [r, c]."""
    s = jnp.repeat(jnp.repeat(scale, tile_rows, axis=0), BLOCK, axis=1)  # [r, c]
    return q.astype(jnp.float32) * s


def column_scales(w_scale, n: int):
    """w_scale [..., k/128, n/128] (128x128 blocks) or [..., k/128, n] (128x1 tiles: one scale per
    column per 128 rows, the wgrad's output-gradient operand) -> [..., k/128, n]."""
    return w_scale if w_scale.shape[-1] == n else jnp.repeat(w_scale, BLOCK, axis=-1)


def scaled_matmul_reference(x_q, x_scale, w_q, w_scale, out_dtype=jnp.float32):
    """x_q [m, k], x_scale [m, k/128], w_q [k, n], w_scale [k/128, n/128] or [k/128, n] -> [m, n]."""
    acc = jnp.zeros((x_q.shape[0], w_q.shape[1]), jnp.float32)  # [m, n]
    w_cols = column_scales(w_scale, w_q.shape[1])  # [k/128, n]
    for b in range(x_q.shape[1] // BLOCK):
        ks = slice(b * BLOCK, (b + 1) * BLOCK)
        part = jnp.dot(x_q[:, ks].astype(jnp.float32), w_q[ks].astype(jnp.float32))  # [m, n]
        acc = acc + part * x_scale[:, b : b + 1] * w_cols[b][None, :]
    return acc.astype(out_dtype)


def grouped_scaled_matmul_reference(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=jnp.float32):
    """Per-expert version: w_q [G, k, n], w_scale [G, k/128, n/128]; rows sorted by group, rows
    past sum(group_sizes) are zero."""
    ends = jnp.cumsum(group_sizes)  # [G]
    rows = jnp.arange(x_q.shape[0])
    out = jnp.zeros((x_q.shape[0], w_q.shape[2]), jnp.float32)  # [m, n]
    for g in range(w_q.shape[0]):
        mine = (rows >= ends[g] - group_sizes[g]) & (rows < ends[g])  # [m]
        out = out + jnp.where(mine[:, None], scaled_matmul_reference(x_q, x_scale, w_q[g], w_scale[g]), 0)
    return out.astype(out_dtype)
