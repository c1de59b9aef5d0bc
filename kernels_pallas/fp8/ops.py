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
from kernels_pallas.fp8.reference import BLOCK
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


# ---- the training recipe: all three products of a linear layer quantized (Sec. 3.3, Figure 6) ----
#
#   fprop  y  = x @ w      x per 1x128 tile (token x 128 channels), w per 128x128 block
#   dgrad  dx = dy @ w^T   dy per 1x128 tile (token x 128 output channels), w^T per 128x128 block
#                          (the same blocks as w's, transposed: w's quantization is reused)
#   wgrad  dw = x^T @ dy   x^T per 1x128 tile along the tokens (x per 128x1), dy per 128x1 too
#
# Every product accumulates in f32, promoted per 128-deep block of its contraction (``scaled_matmul``).
# The scale of a tile is constant along the contraction within a block, which is what makes the
# promotion exact; the wgrad contracts over tokens, hence its 128-token tiles. Operands whose sizes
# are not multiples of 128 are zero-padded here (a zero changes no tile's amax and no product), so
# any layer shape works. The forward saves x^T already quantized (1 byte per element for fp8, the
# report's Sec. 3.3.3 "low-precision storage" of the activations cached for the backward pass).


def _pad(a, *multiples):
    """Zero-pad every axis of ``a`` up to the matching multiple (None: leave that axis)."""
    widths = [(0, 0 if mult is None else -d % mult) for d, mult in zip(a.shape, multiples)]
    return jnp.pad(a, widths) if any(hi for _, hi in widths) else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_matmul(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    return _fp8_matmul_fwd(x, w, fmt, pow2_scale, out_dtype, interpret, impl)[0]


def _fp8_matmul_fwd(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x_q, x_scale = quantize_activations(x, **kw)  # [m, k], [m, k/128]
    w_q, w_scale = quantize_weights(w, **kw)  # [k, n], [k/128, n/128]
    y = scaled_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, interpret=interpret, impl=impl)
    xt_q, xt_scale = quantize_activations(x.T, **kw)  # [k, m], [k, m/128]: wgrad's operand
    dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    return y, (xt_q, xt_scale, w_q, w_scale, dtypes)


def _fp8_matmul_bwd(fmt, pow2_scale, out_dtype, interpret, impl, res, g):
    xt_q, xt_scale, w_q, w_scale, (x_dt, w_dt) = res
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    mm = functools.partial(scaled_matmul, interpret=interpret, impl=impl)
    g_q, g_scale = quantize_activations(g, **kw)  # [m, n], [m, n/128]
    dx = mm(g_q, g_scale, w_q.T, w_scale.T, out_dtype=x_dt.dtype)  # [m, k]
    gt_q, gt_scale = quantize_activations(g.T, **kw)  # [n, m], [n, m/128]: 128x1 tiles of g
    dw = mm(xt_q, xt_scale, gt_q.T, gt_scale.T, out_dtype=w_dt.dtype)  # [k, m] @ [m, n] -> [k, n]
    return dx, dw


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(x, w, *, fmt="fp8", pow2_scale=False, out_dtype=None, interpret=None, impl="auto"):
    """x [m, k] @ w [k, n] -> [m, n] in out_dtype (default x.dtype), DeepSeek-V3's fine-grained recipe
    in all three products (see above); any m, k, n (zero-padded to multiples of 128 inside).
    Gradients: dx in x.dtype, dw in w.dtype (f32 master weights get f32 gradients)."""
    m, n = x.shape[0], w.shape[1]
    x_p, w_p = _pad(x, BLOCK, BLOCK), _pad(w, BLOCK, BLOCK)
    y = _fp8_matmul(x_p, w_p, fmt, pow2_scale, jnp.dtype(out_dtype or x.dtype), interpret, impl)
    return y[:m, :n]


def _dequantize(q, scale, tile_rows):
    return reference.dequantize_reference(q, scale, tile_rows)


def ragged_product(lhs, rhs, group_sizes):
    """f32 grouped product (``lax.ragged_dot``): the default ``product`` of ``grouped_fp8_matmul``."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _grouped_fp8_matmul(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    return _grouped_fp8_matmul_fwd(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product)[0]


def _grouped_product(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype, interpret, impl, product):
    """The block-scaled grouped product: the Pallas kernel, or (impl "xla") ``product`` of the
    dequantized operands in f32, the same sums up to f32 rounding at O(m) cost with a grouped
    ``product`` (the reference loops over every group)."""
    if impl == "pallas":
        return grouped_scaled_matmul(
            x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=out_dtype, interpret=interpret, impl=impl
        )
    w_f = _dequantize(w_q.reshape(-1, w_q.shape[-1]), w_scale.reshape(-1, w_scale.shape[-1]), BLOCK)
    return product(_dequantize(x_q, x_scale, 1), w_f.reshape(w_q.shape), group_sizes).astype(out_dtype)


def _grouped_fp8_matmul_fwd(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    impl, interpret = resolve_impl(impl, interpret)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    owned = (jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None]  # [m, 1]; later rows: no group
    x = jnp.where(owned, x, 0)
    x_q, x_scale = quantize_activations(x, **kw)  # [m, k], [m, k/128]
    w_q, w_scale = quantize_weights(w, **kw)  # [G, k, n], [G, k/128, n/128]
    y = _grouped_product(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype, interpret, impl, product)
    xt_q, xt_scale = quantize_activations(x.T, **kw)  # [k, m], [k, m/128]: wgrad's operand
    dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    return y, (xt_q, xt_scale, w_q, w_scale, group_sizes, dtypes)


def _grouped_fp8_matmul_bwd(fmt, pow2_scale, out_dtype, interpret, impl, product, res, g):
    """dgrad: the grouped product with each expert's blocks transposed; wgrad: per expert, the sum
    over its rows of x^T g with 128x1 tiles of both (a tile may span two experts' rows: it then
    shares one scale, a little coarser than DeepSeek's expert-aligned rows, never wrong)."""
    xt_q, xt_scale, w_q, w_scale, group_sizes, (x_dt, w_dt) = res
    impl, interpret = resolve_impl(impl, interpret)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    owned = (jnp.arange(g.shape[0]) < jnp.sum(group_sizes))[:, None]  # [m, 1]
    g = jnp.where(owned, g, 0)  # the output there is the constant 0: its cotangent is irrelevant
    g_q, g_scale = quantize_activations(g, **kw)  # [m, n], [m, n/128]
    wt_q, wt_scale = w_q.swapaxes(1, 2), w_scale.swapaxes(1, 2)  # [G, n, k], [G, n/128, k/128]
    dx = _grouped_product(g_q, g_scale, wt_q, wt_scale, group_sizes, x_dt.dtype, interpret, impl, product)
    gt_q, gt_scale = quantize_activations(g.T, **kw)  # [n, m], [n, m/128]
    xt = _dequantize(xt_q, xt_scale, 1).T  # [m, k]: x with its 128x1 tiles applied
    gt = _dequantize(gt_q, gt_scale, 1).T  # [m, n]
    if impl == "pallas":
        dw = gmm_ops.tgmm(xt, gt, group_sizes, preferred_element_type=jnp.float32, interpret=interpret)
    else:  # the transpose of ``product`` in its rhs: the per-group x^T g
        _, vjp = jax.vjp(lambda w_f: product(xt, w_f, group_sizes), jnp.zeros(w_q.shape, jnp.float32))
        (dw,) = vjp(gt)
    return dx, dw.astype(w_dt.dtype), None


_grouped_fp8_matmul.defvjp(_grouped_fp8_matmul_fwd, _grouped_fp8_matmul_bwd)


def grouped_fp8_matmul(
    x, w, group_sizes, *, fmt="fp8", pow2_scale=False, out_dtype=None, interpret=None, impl="auto", product=None
):
    """Per-expert ``fp8_matmul``: x [m, k] rows sorted by group, w [G, k, n], group_sizes [G] int32
    (sum <= m; rows past the sum give zeros) -> [m, n], all three products quantized as in
    ``fp8_matmul`` (each expert's weight in its own 128x128 blocks); any m, k, n (zero-padded).
    ``product(lhs, rhs, group_sizes) -> f32``: the grouped product of dequantized operands that the
    "xla" impl uses (default ``ragged_product``; the model passes its own grouped matmul, whose
    CPU cost is O(m) rather than ``ragged_dot``'s O(G m) there). It must be differentiable in rhs."""
    m, n = x.shape[0], w.shape[2]
    x_p, w_p = _pad(x, BLOCK, BLOCK), _pad(w, None, BLOCK, BLOCK)
    y = _grouped_fp8_matmul(
        x_p,
        w_p,
        group_sizes.astype(jnp.int32),
        fmt,
        pow2_scale,
        jnp.dtype(out_dtype or x.dtype),
        interpret,
        impl,
        product or ragged_product,
    )
    return y[:m, :n]
