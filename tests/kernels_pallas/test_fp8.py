"""Fine-grained fp8 / int8 quantization and block-scaled matmuls (interpret mode) vs references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.fp8 import (
    BlockSizes,
    fp8_matmul,
    grouped_fp8_matmul,
    grouped_scaled_matmul,
    quantize_activations,
    quantize_weights,
    scaled_matmul,
)
from kernels_pallas.fp8 import reference as ref
from tests.tolerances import assert_close

FORMATS = [("fp8", False), ("fp8", True), ("int8", False), ("int8", True)]


def _deq(q, s, tile_rows):
    return np.asarray(ref.dequantize_reference(q, s, tile_rows))


def _check_error_bound(x, q, s, tile_rows, fmt):
    """Elementwise bound on |dequant(q) - x|, derived from the format.

    In scaled units y = x / s, |y| <= qmax, so the tile's largest value lands on the grid's top.
    float8_e4m3fn has 3 mantissa bits: a normal y (|y| >= 2^-6) lies in [2^e, 2^(e+1)) where the
    spacing is 2^(e-3), so round-to-nearest errs by at most half of it, 2^(e-4) <= 2^-4 |y|; below
    2^-6 the subnormal spacing is 2^-9, an error of at most 2^-10. Hence
    |x_hat - x| <= s * max(2^-4 |y|, 2^-10). int8 rounds to the integer grid: |x_hat - x| <= s / 2.
    The 1e-6 relative slack covers the f32 rounding of x / s and of q * s (2^-24 each).
    """
    x = np.asarray(x, np.float32)
    s_full = np.repeat(np.repeat(np.asarray(s), tile_rows, 0), ref.BLOCK, 1)  # [r, c]
    err = np.abs(_deq(q, s, tile_rows) - x)
    if fmt == "fp8":
        bound = np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * s_full)
    else:
        bound = 0.5 * s_full
    assert (err <= bound * (1 + 1e-6) + 1e-6 * np.abs(x)).all(), float((err / (bound + 1e-30)).max())


@settings(max_examples=8, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    m=st.sampled_from([8, 40]),
    k=st.sampled_from([128, 256]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_quantize_matches_reference_and_error_bound(fmt, m, k, seed, scale):
    fmt, pow2 = fmt
    x = scale * jax.random.normal(jax.random.key(seed), (m, k), jnp.float32)
    w = scale * jax.random.normal(jax.random.key(seed + 1), (k, 128), jnp.float32)
    for a, tile_rows, fn in [(x, 1, quantize_activations), (w, 128, quantize_weights)]:
        q, s = fn(a, fmt=fmt, pow2_scale=pow2, impl="pallas")
        q_ref, s_ref = ref.quantize_reference(a, tile_rows, fmt, pow2)
        assert q.dtype == ref.QUANT_FORMATS[fmt][0] and s.shape == s_ref.shape
        np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(q_ref, np.float32))
        np.testing.assert_array_equal(s, s_ref)
        _check_error_bound(a, q, s, tile_rows, fmt)
        if pow2:
            assert (np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s)))).all()


def test_zero_tile_and_outlier_isolation():
    """amax = 0 gives scale 1 and zeros; an outlier changes only its own tile's scale and values."""
    x = jax.random.normal(jax.random.key(0), (16, 256), jnp.float32).at[3, 128:].set(0.0)
    q, s = quantize_activations(x, impl="pallas")
    assert float(s[3, 1]) == 1.0 and not np.asarray(q[3, 128:], np.float32).any()
    x_out = x.at[5, 7].set(1e4)
    q_out, s_out = quantize_activations(x_out, impl="pallas")
    others = np.ones((16, 2), bool)
    others[5, 0] = False
    np.testing.assert_array_equal(np.asarray(s_out)[others], np.asarray(s)[others])
    err, err_out = (np.abs(_deq(a, b, 1) - np.asarray(x)) for a, b in [(q, s), (q_out, s_out)])
    keep = np.repeat(others, 128, axis=1)
    keep[5, 7] = False
    np.testing.assert_array_equal(err_out[keep], err[keep])
    assert float(s_out[5, 0]) > 100 * float(s[5, 0])  # the outlier's own tile lost resolution

    w = jax.random.normal(jax.random.key(1), (256, 256), jnp.float32)
    qw, sw = quantize_weights(w, impl="pallas")
    qw_out, sw_out = quantize_weights(w.at[130, 5].set(1e4), impl="pallas")
    blocks = np.ones((2, 2), bool)
    blocks[1, 0] = False
    np.testing.assert_array_equal(np.asarray(sw_out)[blocks], np.asarray(sw)[blocks])
    np.testing.assert_array_equal(np.asarray(qw_out, np.float32)[:128], np.asarray(qw, np.float32)[:128])
    np.testing.assert_array_equal(np.asarray(qw_out, np.float32)[128:, 128:], np.asarray(qw, np.float32)[128:, 128:])


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_scaled_matmul_matches_blockwise_reference(fmt, out_dtype):
    x = jax.random.normal(jax.random.key(2), (40, 256), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (256, 128), jnp.float32) / 16
    x_q, x_s = quantize_activations(x, fmt=fmt, impl="pallas")
    w_q, w_s = quantize_weights(w, fmt=fmt, impl="pallas")
    out = scaled_matmul(x_q, x_s, w_q, w_s, out_dtype=out_dtype, impl="pallas")
    assert out.dtype == out_dtype
    assert_close(out, ref.scaled_matmul_reference(x_q, x_s, w_q, w_s, out_dtype), out_dtype, composite=True)


@settings(max_examples=4, deadline=None)
@given(sizes=st.sampled_from([[0, 40, 0], [13, 0, 20], [0, 0, 0], [8, 16, 16]]), fmt=st.sampled_from(["fp8", "int8"]))
def test_grouped_scaled_matmul_matches_reference(sizes, fmt):
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(4), (40, 128), jnp.float32)
    w = jax.random.normal(jax.random.key(5), (3, 128, 256), jnp.float32) / 12
    x_q, x_s = quantize_activations(x, fmt=fmt, impl="pallas")
    w_q, w_s = quantize_weights(w, fmt=fmt, impl="pallas")  # [3, 128, 256], [3, 1, 2]
    out = grouped_scaled_matmul(
        x_q, x_s, w_q, w_s, sizes, out_dtype=jnp.float32, block_sizes=BlockSizes(rows=16, tm=16, tn=128), impl="pallas"
    )
    want = ref.grouped_scaled_matmul_reference(x_q, x_s, w_q, w_s, sizes)
    assert_close(out, want, jnp.float32, composite=True)


# Measured on random normal operands (m=64, k=512, n=256), relative Frobenius error vs f32:
# fp8 ~3.7%, int8 ~1.2%. For e4m3 the floor is set by the format, not the kernel: 3 mantissa bits
# give each operand an rms relative rounding error of ~2.6% (measured below), and the product
# carries both, sqrt(2) * 2.6% ~= 3.7%. So the test checks (a) the matmul adds nothing beyond
# operand quantization: err <= 1.1 * sqrt(ex^2 + ew^2), and (b) the absolute figure: int8 <= 2e-2,
# fp8 <= 5e-2 (2e-2 is below what 1x128 / 128x128 e4m3 can reach on normal inputs).
@pytest.mark.parametrize("fmt,limit", [("fp8", 5e-2), ("int8", 2e-2)])
def test_fp8_matmul_error_vs_f32(fmt, limit):
    x = jax.random.normal(jax.random.key(6), (64, 512), jnp.float32)
    w = jax.random.normal(jax.random.key(7), (512, 256), jnp.float32) / np.sqrt(512)
    exact = np.asarray(x @ w)
    out = np.asarray(fp8_matmul(x, w, fmt=fmt, out_dtype=jnp.float32, impl="pallas"))
    rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    (x_q, x_s), (w_q, w_s) = ref.quantize_reference(x, 1, fmt), ref.quantize_reference(w, 128, fmt)
    ex = np.linalg.norm(_deq(x_q, x_s, 1) - np.asarray(x)) / np.linalg.norm(np.asarray(x))
    ew = np.linalg.norm(_deq(w_q, w_s, 128) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    print(f"{fmt}_matmul relative error vs f32: {rel:.4f} (operands: x {ex:.4f}, w {ew:.4f})")
    assert rel <= 1.1 * np.hypot(ex, ew)
    assert rel <= limit


def test_fp8_matmul_straight_through_gradient_and_xla_path():
    x = jax.random.normal(jax.random.key(8), (32, 256), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(9), (256, 128), jnp.float32) / 16).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(10), (32, 128), jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, impl="pallas"), x, w)
    assert out.dtype == jnp.bfloat16
    assert_close(out, fp8_matmul(x, w, impl="xla"), jnp.bfloat16)
    dx, dw = vjp(g)
    _, vjp_exact = jax.vjp(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype), x, w)
    dx_ref, dw_ref = vjp_exact(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    assert_close(dx, dx_ref, jnp.bfloat16)
    assert_close(dw, dw_ref, jnp.bfloat16)


def test_fp8_matmul_vjp_is_the_adjoint_of_the_unquantized_product():
    """Straight-through, checked by its defining property rather than its formula: the VJP must be
    the adjoint of the *unquantized* product's derivative, <g, dx' @ w + x @ dw'> = <dx, dx'> +
    <dw, dw'> for any directions dx', dw' (both sides in float64 numpy). The quantized forward's
    own derivative differs (zero almost everywhere within a block, plus the scales' terms); so
    does a VJP built from the quantized operands (~3% off here), a transposed or rescaled one."""
    m, k, n = 24, 256, 128
    keys = jax.random.split(jax.random.key(11), 5)
    x, dx_dir = (jax.random.normal(kk, (m, k), jnp.float32) for kk in keys[:2])
    w, dw_dir = (jax.random.normal(kk, (k, n), jnp.float32) / 16 for kk in keys[2:4])
    g = jax.random.normal(keys[4], (m, n), jnp.float32)
    _, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, out_dtype=jnp.float32, impl="pallas"), x, w)
    dx, dw = (np.asarray(a, np.float64) for a in vjp(g))
    x, w, g, dx_dir, dw_dir = (np.asarray(a, np.float64) for a in (x, w, g, dx_dir, dw_dir))
    jx, jw = g * (dx_dir @ w), g * (x @ dw_dir)  # [m, n] terms of the two directional derivatives
    scale = 1e-5 * (np.abs(jx).sum() + np.abs(jw).sum())  # f32 cotangents: ~1e-7 relative per term
    # The two terms separately (dw' = 0, then dx' = 0).
    assert abs(np.sum(dx * dx_dir) - np.sum(jx)) <= scale
    assert abs(np.sum(dw * dw_dir) - np.sum(jw)) <= scale


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_grouped_fp8_matmul_forward_and_straight_through_vjp(impl):
    """Forward: quantize both operands, then the grouped block-scaled matmul (its reference).
    Backward: straight-through, i.e. the VJP of the unquantized product out[r] = x[r] @ w[e(r)] for
    the rows r of group e (zero past sum(sizes)), written here in float64 numpy from that
    definition: dx[r] = g[r] @ w[e(r)]^T, dw[e] = sum over rows r of e of x[r]^T g[r]. The groups
    include an empty one and 7 trailing rows that belong to none; their cotangents must vanish."""
    sizes = jnp.asarray([13, 0, 20], jnp.int32)  # rows 33..39 belong to no group
    m, k, n, groups = 40, 256, 128, 3
    keys = jax.random.split(jax.random.key(12), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (groups, k, n), jnp.float32) / 16
    g = jax.random.normal(keys[2], (m, n), jnp.float32)
    f = lambda a, b: grouped_fp8_matmul(a, b, sizes, out_dtype=jnp.float32, impl=impl)
    out, vjp = jax.vjp(f, x, w)
    x_q, x_s = ref.quantize_reference(x, 1)
    w_q, w_s = quantize_weights(w, impl="xla")
    assert_close(out, ref.grouped_scaled_matmul_reference(x_q, x_s, w_q, w_s, sizes), jnp.float32, composite=True)
    dx, dw = (np.asarray(a, np.float64) for a in vjp(g))
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    ends = np.cumsum(np.asarray(sizes))
    dx_ref, dw_ref = np.zeros((m, k)), np.zeros((groups, k, n))
    for e in range(groups):
        rows = slice(ends[e] - int(sizes[e]), ends[e])
        dx_ref[rows] = g[rows] @ w[e].T  # [rows, k]
        dw_ref[e] = x[rows].T @ g[rows]  # [k, n]
    # f32 accumulation over <= 256 terms of O(1) products: ~1e-6 of the largest entry.
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
    assert not dx[33:].any() and not dw[1].any()  # rows of no group, the empty expert
