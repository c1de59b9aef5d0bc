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


def _fprop(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x_q, x_scale = quantize_activations(x, **kw)  # [m, k], [m, k/128]
    w_q, w_scale = quantize_weights(w, **kw)  # [k, n], [k/128, n/128]
    return scaled_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, interpret=interpret, impl=impl), w_q, w_scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_matmul(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    return _fprop(x, w, fmt, pow2_scale, out_dtype, interpret, impl)[0]


def _fp8_matmul_fwd(x, w, fmt, pow2_scale, out_dtype, interpret, impl):
    y, w_q, w_scale = _fprop(x, w, fmt, pow2_scale, out_dtype, interpret, impl)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
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
    # (the residuals the forward rule also builds are dead code here, which XLA removes)
    return _grouped_fp8_matmul_fwd(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product)[0]


def _grouped_product(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype, interpret, impl, product, chunk=None):
    """The block-scaled grouped product: the Pallas kernel, or (impl "xla") ``product`` of the
    dequantized operands in f32, the same sums up to f32 rounding at O(m) cost with a grouped
    ``product`` (the reference loops over every group). ``chunk``: rows of the weight along the
    contraction dequantized at a time there (a multiple of 128; None: all at once, fine for a
    weight quantized from its f32 master; a stored FP8 weight uses 128, one [G, 128, n] f32 slab at
    a time instead of an f32 copy of the whole weight)."""
    if impl == "pallas":
        return grouped_scaled_matmul(
            x_q, x_scale, w_q, w_scale, group_sizes, out_dtype=out_dtype, interpret=interpret, impl=impl
        )
    x_f = _dequantize(x_q, x_scale, 1)  # [m, k]
    step = chunk or w_q.shape[1]

    def part(b):  # the K rows [b * step, (b + 1) * step) of the product
        w_b = jax.lax.dynamic_slice_in_dim(w_q, b * step, step, 1)  # [G, step, n]
        s_b = jax.lax.dynamic_slice_in_dim(w_scale, b * (step // BLOCK), step // BLOCK, 1)  # [G, step/128, n/128]
        w_f = _dequantize(w_b.reshape(-1, w_b.shape[-1]), s_b.reshape(-1, s_b.shape[-1]), BLOCK)
        return product(jax.lax.dynamic_slice_in_dim(x_f, b * step, step, 1), w_f.reshape(w_b.shape), group_sizes)

    n_parts = w_q.shape[1] // step
    y = part(0) if n_parts == 1 else jax.lax.fori_loop(1, n_parts, lambda b, acc: acc + part(b), part(0))
    return y.astype(out_dtype)


def _owned(x, group_sizes):
    """x [m, ...] with its rows past sum(group_sizes) (no group's) zeroed."""
    return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None], x, 0)


def _grouped_dgrad(g, w_q, w_scale, group_sizes, x_dtype, kw, product, chunk=None):
    """dx = g @ w^T per expert: g [m, n] per 1x128 tile times each expert's blocks transposed -> [m, k]."""
    g_q, g_scale = quantize_activations(g, **kw)  # [m, n], [m, n/128]
    wt_q, wt_scale = w_q.swapaxes(1, 2), w_scale.swapaxes(1, 2)  # [G, n, k], [G, n/128, k/128]
    return _grouped_product(
        g_q, g_scale, wt_q, wt_scale, group_sizes, x_dtype, kw["interpret"], kw["impl"], product, chunk
    )


def _grouped_fp8_matmul_fwd(x, w, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    impl, interpret = resolve_impl(impl, interpret)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x = _owned(x, group_sizes)  # later rows: no group
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
    g = _owned(g, group_sizes)  # the output there is the constant 0: its cotangent is irrelevant
    dx = _grouped_dgrad(g, w_q, w_scale, group_sizes, x_dt.dtype, kw, product)
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


# ---- a weight already quantized (e.g. DeepSeek's FP8 checkpoint kept as stored): inference ----


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _grouped_prequantized(x, w_q, w_scale, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    return _grouped_prequantized_fwd(
        x, w_q, w_scale, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product
    )[0]


def _grouped_prequantized_fwd(x, w_q, w_scale, group_sizes, fmt, pow2_scale, out_dtype, interpret, impl, product):
    impl, interpret = resolve_impl(impl, interpret)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    x_q, x_scale = quantize_activations(_owned(x, group_sizes), **kw)  # [m, k], [m, k/128]
    y = _grouped_product(x_q, x_scale, w_q, w_scale, group_sizes, out_dtype, interpret, impl, product, BLOCK)
    return y, (w_q, w_scale, group_sizes, jnp.zeros((), x.dtype))


def _grouped_prequantized_bwd(fmt, pow2_scale, out_dtype, interpret, impl, product, res, g):
    """The recipe's dgrad (as ``_grouped_fp8_matmul_bwd``); the stored weight gets no gradient."""
    w_q, w_scale, group_sizes, x_dt = res
    impl, interpret = resolve_impl(impl, interpret)
    kw = dict(fmt=fmt, pow2_scale=pow2_scale, interpret=interpret, impl=impl)
    dx = _grouped_dgrad(_owned(g, group_sizes), w_q, w_scale, group_sizes, x_dt.dtype, kw, product, BLOCK)
    return dx, None, None, None


_grouped_prequantized.defvjp(_grouped_prequantized_fwd, _grouped_prequantized_bwd)


def grouped_prequantized_matmul(
    x,
    w_q,
    w_scale,
    group_sizes,
    *,
    fmt="fp8",
    pow2_scale=False,
    out_dtype=None,
    interpret=None,
    impl="auto",
    product=None,
):
    """``grouped_fp8_matmul``'s forward with the weight already quantized: w_q [G, k, n] (e4m3 or
    int8) and w_scale [G, ceil(k/128), ceil(n/128)] f32 per 128x128 block (w = w_q * w_scale, e.g.
    DeepSeek's ``weight_scale_inv`` per expert). x is quantized per 1x128 tile (``fmt``) and
    multiplied with the stored blocks, never with an f32 copy of the whole weight (the "xla" impl
    dequantizes 128 rows of it at a time; XLA:CPU, which has no float8, still converts a float8
    operand it slices to f16 first: docs/benchmarks.md). Gradients: dx by the recipe's dgrad; none
    for the weight (inference). Any m, k, n (partial blocks zero-padded: a zero changes no product)."""
    (g, k, n), m = w_q.shape, x.shape[0]
    want = (g, -(-k // BLOCK), -(-n // BLOCK))
    if tuple(w_scale.shape) != want or x.shape[1] != k:
        raise ValueError(
            f"grouped_prequantized_matmul: x {tuple(x.shape)}, w_q {tuple(w_q.shape)} need x [m, {k}] and "
            f"w_scale {want} (one per 128x128 block), got w_scale {tuple(w_scale.shape)}"
        )
    y = _grouped_prequantized(
        _pad(x, BLOCK, BLOCK),
        _pad(w_q, None, BLOCK, BLOCK),
        w_scale.astype(jnp.float32),
        group_sizes.astype(jnp.int32),
        fmt,
        pow2_scale,
        jnp.dtype(out_dtype or x.dtype),
        interpret,
        impl,
        product or ragged_product,
    )
    return y[:m, :n]
