"""Public fine-grained low-precision ops (DeepSeek-V3 report, Sec. 3.3) with backend dispatch.

impl: "pallas" (kernels; compiled on TPU, interpreted elsewhere when interpret is None), "xla"
(the jnp reference), "auto" (``kernels_pallas.backend.resolve``: pallas on TPU, xla elsewhere).
fmt: "fp8" (float8_e4m3fn, qmax 448)
or "int8" (qmax 127, round to nearest).
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.backend import interpret_default, resolve
from kernels_pallas.fp8 import kernel, reference
from kernels_pallas.fp8.kernel import BlockSizes
from kernels_pallas.gmm import ops as gmm_ops


def resolve_impl(impl, interpret):
    """("pallas" | "xla", interpret); "auto" is resolved by the shared ``kernels_pallas.backend``."""
    if impl == "auto":
        impl = "pallas" if resolve(impl) == "pallas" else "xla"
    if impl not in ("pallas", "xla"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    return impl, interpret_default(interpret)


def quantize_activations(x, *, fmt="fp8", pow2_scale=False, block_sizes=BlockSizes(), interpret=None, impl="auto"):
    """x [m, k] -> (q [m, k], scale [m, k/128] f32): one scale per token per 128 channels."""
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "xla":
        return reference.quantize_reference(x, 1, fmt, pow2_scale)
    return kernel.quantize(x, tile_rows=1, fmt=fmt, pow2_scale=pow2_scale, block_sizes=block_sizes, interpret=interpret)


def quantize_weights(w, *, fmt="fp8", pow2_scale=False, interpret=None, impl="auto"):
    """w [k, n] or [G, k, n] -> (q, scale [(G,) k/128, n/128] f32): one scale per 128x128 block."""
    impl, interpret = resolve_impl(impl, interpret)
    lead, (k, n) = w.shape[:-2], w.shape[-2:]
    if k % reference.BLOCK:
        raise ValueError(f"k must be a multiple of 128, got {k}")
    w2 = w.reshape(-1, n)  # [G*k, n]: 128-row blocks never straddle experts
    if impl == "xla":
        q, s = reference.quantize_reference(w2, reference.BLOCK, fmt, pow2_scale)
    else:
        q, s = kernel.quantize(w2, tile_rows=reference.BLOCK, fmt=fmt, pow2_scale=pow2_scale, interpret=interpret)
    return q.reshape(w.shape), s.reshape(*lead, k // reference.BLOCK, n // reference.BLOCK)


def scaled_matmul(
    x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16, block_sizes=BlockSizes(), interpret=None, impl="auto"
):
    """sum over 128-deep K blocks b of (x_q[:, b] @ w_q[b]) * x_scale[:, b] * w_scale[b], f32
    accumulation. x_q [m, k], x_scale [m, k/128], w_q [k, n], w_scale [k/128, n/128] -> [m, n]."""
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "xla":
        return reference.scaled_matmul_reference(x_q, x_scale, w_q, w_scale, out_dtype)
    return kernel.scaled_matmul(
        x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret
    )


def grouped_scaled_matmul(
    x_q,
    x_scale,
    w_q,
    w_scale,
    group_sizes,
    *,
    out_dtype=jnp.bfloat16,
    block_sizes=BlockSizes(),
    interpret=None,
    impl="auto",
):
    """Per-expert scaled_matmul: w_q [G, k, n], w_scale [G, k/128, n/128], rows sorted by group."""
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "xla":
        return reference.grouped_scaled_matmul_reference(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype)
    return kernel.grouped_scaled_matmul(
        x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_matmul(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x_q, x_scale = quantize_activations(x, **kw)  # [m, k], [m, k/128]
    w_q, w_scale = quantize_weights(w, **kw)  # [k, n], [k/128, n/128]
    return scaled_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, interpret=interpret, impl=impl)


def _fp8_matmul_fwd(x, w, *static):
    return _fp8_matmul(x, w, *static), (x, w)


def _fp8_matmul_bwd(fmt, pow2_scale, out_dtype, interpret, impl, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)  # [m, k]
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)  # [k, n]
    return dx, dw


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(x, w, *, fmt="fp8", pow2_scale=False, out_dtype=None, interpret=None, impl="auto"):
    """x [m, k] @ w [k, n] with both operands quantized (1x128 tiles for x, 128x128 blocks for w) and
    f32 block accumulation. k and n must be multiples of 128.

    Backward is the straight-through estimator: quantization is treated as the identity, so
    dx = g @ w^T and dw = x^T @ g, computed from the unquantized inputs in the input dtype (f32
    accumulation). (DeepSeek-V3 also quantizes the backward GEMMs; this helper does not.)
    """
    return _fp8_matmul(x, w, fmt, pow2_scale, out_dtype or x.dtype, interpret, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _grouped_fp8_matmul(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl):
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x_q, x_scale = quantize_activations(x, **kw)  # [m, k], [m, k/128]
    w_q, w_scale = quantize_weights(w, **kw)  # [G, k, n], [G, k/128, n/128]
    return grouped_scaled_matmul(
        x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=out_dtype, interpret=interpret, impl=impl
    )


def _grouped_fp8_matmul_fwd(x, w, group_sizes, *static):
    return _grouped_fp8_matmul(x, w, group_sizes, *static), (x, w, group_sizes)


def _grouped_fp8_matmul_bwd(fmt, pow2_scale, out_dtype, interpret, impl, res, g):
    """Straight-through: the VJP of the unquantized grouped product x[rows of e] @ w[e]."""
    x, w, group_sizes = res
    g = g.astype(x.dtype)  # [m, n]
    impl, interpret = resolve_impl(impl, interpret)
    if impl == "xla":
        product = lambda a, b: jax.lax.ragged_dot(a, b, group_sizes, preferred_element_type=jnp.float32)
    else:
        product = lambda a, b: gmm_ops.gmm(a, b, group_sizes, preferred_element_type=jnp.float32, interpret=interpret)
    _, vjp = jax.vjp(product, x, w)
    dx, dw = vjp(g.astype(jnp.float32))  # [m, k], [G, k, n]
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_grouped_fp8_matmul.defvjp(_grouped_fp8_matmul_fwd, _grouped_fp8_matmul_bwd)


def grouped_fp8_matmul(x, w, group_sizes, *, fmt="fp8", pow2_scale=False, out_dtype=None, interpret=None, impl="auto"):
    """Per-expert ``fp8_matmul``: x [m, k] rows sorted by group, w [G, k, n], group_sizes [G] int32
    (sum <= m; rows past the sum give zeros) -> [m, n]. Both operands quantized as in ``fp8_matmul``
    (each expert's weight in its own 128x128 blocks). Backward: straight-through, the VJP of the
    unquantized grouped product (``lax.ragged_dot`` for impl "xla", the Pallas gmm otherwise)."""
    return _grouped_fp8_matmul(
        x, w, group_sizes.astype(jnp.int32), fmt, pow2_scale, out_dtype or x.dtype, interpret, impl
    )
