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
    grouped_prequantized_matmul,
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


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_tiny_tile_gets_a_normal_scale_not_nan(impl):
    """A tile whose amax / qmax is subnormal (amax 1e-37): XLA:CPU flushed that scale to 0 and the
    tile's zeros became 0 / 0 = NaN (an FP8 training run's gradients went NaN at step 116). The
    scale is now at least f32's smallest normal; the values stay finite and dequantise close."""
    x = jnp.zeros((2, 256), jnp.float32).at[0, 0].set(1e-37).at[1, 130].set(-3e-38)
    q, s = quantize_activations(x, impl=impl)
    assert np.isfinite(np.asarray(q, np.float32)).all() and (np.asarray(s) > 0).all()
    np.testing.assert_allclose(_deq(q, s, 1), np.asarray(x), rtol=0.07, atol=0)


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


# ---- the training recipe (ops.fp8_matmul / grouped_fp8_matmul): all three products quantized ----
# The oracle below spells the tiles out on zero-padded float64 copies: fprop x 1x128 / w 128x128;
# dgrad g 1x128 / w^T 128x128; wgrad x 128x1 / g 128x1 (tiles along the tokens, the contraction).
# A straight-through backward, a tile along the wrong axis or a dropped scale differs from it by
# the format's error (~4%), 4000x the tolerance (f32 accumulation order, 1e-5 of the largest entry).


def _fake(a, tile_rows, fmt="fp8"):
    """a [r, c] -> dequantize(quantize(a)) in float64 after zero-padding both axes to 128."""
    a = np.asarray(a, np.float32)
    a = np.pad(a, [(0, -d % 128) for d in a.shape])
    q, s = ref.quantize_reference(jnp.asarray(a), tile_rows, fmt)
    return np.asarray(ref.dequantize_reference(q, s, tile_rows), np.float64)


def _recipe_oracle(x, w, g, fmt="fp8"):
    """(y, dx, dw) of one [m, k] @ [k, n] product under the recipe, float64; and the operand pairs."""
    (m, k), n = x.shape, w.shape[1]
    xf, wf, gf = _fake(x, 1, fmt), _fake(w, 128, fmt), _fake(g, 1, fmt)
    xtf, gtf = _fake(np.asarray(x).T, 1, fmt), _fake(np.asarray(g).T, 1, fmt)  # [k, m], [n, m] padded
    y, dx, dw = xf @ wf, gf @ wf.T, xtf @ gtf.T
    pairs = {"y": (xf, wf), "dx": (gf, wf.T), "dw": (xtf, gtf.T)}
    return (y[:m, :n], dx[:m, :k], dw[:k, :n]), pairs


def _assert_recipe(got, want):
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        a = np.asarray(a, np.float64)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_fp8_matmul_recipe_all_three_products(impl):
    """Sizes that are no multiple of 128 (padded inside); forward, dgrad and wgrad against the
    oracle, gradients in the operands' dtypes, and each product within the format's bound of the
    exact f32 product: rel. error <= 1.1 x the operands' combined quantization error."""
    m, k, n = 40, 200, 136
    keys = jax.random.split(jax.random.key(13), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (k, n), jnp.float32) / 16
    g = jax.random.normal(keys[2], (m, n), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, out_dtype=jnp.float32, impl=impl), x, w)
    dx, dw = vjp(g)
    assert y.shape == (m, n) and dx.shape == (m, k) and dw.shape == (k, n)
    want, pairs = _recipe_oracle(x, w, g)
    _assert_recipe((y, dx, dw), want)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    exact = {"y": x64 @ w64, "dx": g64 @ w64.T, "dw": x64.T @ g64}
    operands = {"y": (x64, w64), "dx": (g64, w64.T), "dw": (x64.T, g64)}
    for name, got in zip(("y", "dx", "dw"), (y, dx, dw)):
        rel = np.linalg.norm(np.asarray(got) - exact[name]) / np.linalg.norm(exact[name])
        errs = [
            np.linalg.norm(f[: a.shape[0], : a.shape[1]] - a) / np.linalg.norm(a)
            for f, a in zip(pairs[name], operands[name])
        ]
        assert rel <= 1.1 * np.hypot(*errs), (name, rel, errs)


def test_fp8_matmul_gradient_dtypes_follow_operands():
    """bf16 activations, f32 master weight: y and dx in bf16, dw in f32."""
    x = jax.random.normal(jax.random.key(8), (32, 128), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(9), (128, 128), jnp.float32) / 16
    y, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, impl="xla"), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_grouped_fp8_matmul_recipe_all_three_products(impl):
    """Per expert, the three products of the recipe (expert e's rows against its own 128x128 weight
    blocks; the wgrad sums x^T g over e's rows with 128x1 tiles along the tokens). Groups include an
    empty one and 7 trailing rows that belong to none (zeroed before quantizing): their outputs and
    cotangents vanish, and the empty expert's weight gradient is exactly zero."""
    sizes = jnp.asarray([13, 0, 20], jnp.int32)
    m, k, n, groups = 40, 136, 128, 3
    keys = jax.random.split(jax.random.key(12), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (groups, k, n), jnp.float32) / 16
    g = jax.random.normal(keys[2], (m, n), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: grouped_fp8_matmul(a, b, sizes, out_dtype=jnp.float32, impl=impl), x, w)
    dx, dw = vjp(g)
    owned = np.arange(m)[:, None] < 33
    xz, gz = np.where(owned, x, 0), np.where(owned, g, 0)
    xf, gf = _fake(xz, 1), _fake(gz, 1)  # [128, 256], [128, 128]
    xtf, gtf = _fake(xz.T, 1).T, _fake(gz.T, 1).T  # [128, 256], [128, 128]: 128x1 tiles
    y_ref, dx_ref, dw_ref = np.zeros((m, n)), np.zeros((m, k)), np.zeros((groups, k, n))
    ends = np.cumsum(np.asarray(sizes))
    for e in range(groups):
        rows = slice(ends[e] - int(sizes[e]), ends[e])
        wf = _fake(w[e], 128)  # [256, 128]
        y_ref[rows] = (xf[rows] @ wf)[:, :n]
        dx_ref[rows] = (gf[rows] @ wf.T)[:, :k]
        dw_ref[e] = (xtf[rows].T @ gtf[rows])[:k, :n]
    _assert_recipe((y, dx, dw), (y_ref, dx_ref, dw_ref))
    assert not np.asarray(y)[33:].any() and not np.asarray(dx)[33:].any() and not np.asarray(dw)[1].any()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_grouped_prequantized_matmul_against_the_dequantized_weight(impl):
    """A weight already quantized (e4m3 + one scale per 128x128 block of each expert, as DeepSeek's
    FP8 experts are stored): forward and dgrad against the f32 product with the dequantised weight,
    within the format's bound (rel. error <= 1.1 x the operands' combined quantization error; the
    weight's is 0, it IS q * scale) and against the float64 oracle of the same tiles (1e-5). Partial
    blocks (k 200, n 136), an empty expert, 7 rows of no expert. The XLA engine's program (jaxpr)
    never builds an f32 copy of the whole (padded) weight, only 128-row slabs of it; the weight
    gets no gradient."""
    sizes = jnp.asarray([13, 0, 20], jnp.int32)
    m, k, n, groups = 40, 200, 136, 3
    keys = jax.random.split(jax.random.key(14), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (groups, k, n), jnp.float32) / 16
    g = jax.random.normal(keys[2], (m, n), jnp.float32)
    q, s = quantize_weights(jnp.pad(w, ((0, 0), (0, 56), (0, 120))), impl="xla")  # [3, 256, 256], [3, 2, 2]
    q = q[:, :k, :n]
    wd = np.asarray(q, np.float64) * np.repeat(np.repeat(np.asarray(s, np.float64), 128, 1), 128, 2)[:, :k, :n]

    def f(a, q_, s_):
        return grouped_prequantized_matmul(a, q_, s_, sizes, out_dtype=jnp.float32, impl=impl)

    y, dx, dq, ds = jax.jit(lambda *a: (lambda yv: (yv[0], *yv[1](g)))(jax.vjp(f, *a)))(x, q, s)
    assert not np.asarray(dq, np.float32).any() and not np.asarray(ds).any()
    owned = np.arange(m)[:, None] < 33
    xz, gz = np.where(owned, x, 0).astype(np.float64), np.where(owned, g, 0).astype(np.float64)
    xf, gf = _fake(xz, 1)[:, :k], _fake(gz, 1)[:, :n]  # the 1x128 tiles of the owned rows
    y_ref, dx_ref, y_f32, dx_f32 = np.zeros((m, n)), np.zeros((m, k)), np.zeros((m, n)), np.zeros((m, k))
    ends = np.cumsum(np.asarray(sizes))
    for e in range(groups):
        rows = slice(ends[e] - int(sizes[e]), ends[e])
        y_ref[rows], dx_ref[rows] = xf[rows] @ wd[e], gf[rows] @ wd[e].T
        y_f32[rows], dx_f32[rows] = xz[rows] @ wd[e], gz[rows] @ wd[e].T
    _assert_recipe((y, dx), (y_ref, dx_ref))
    assert not np.asarray(y)[33:].any() and not np.asarray(dx)[33:].any()
    for got, exact, a, af in [(y, y_f32, xz, xf), (dx, dx_f32, gz, gf)]:
        rel = np.linalg.norm(np.asarray(got) - exact) / np.linalg.norm(exact)
        err = np.linalg.norm(af[:33] - a[:33]) / np.linalg.norm(a[:33])  # the weight's error is 0
        assert 0.1 * err < rel <= 1.1 * err, (rel, err)
    if impl == "xla":
        text = str(jax.make_jaxpr(jax.grad(lambda a: f(a, q, s).sum()))(x))
        assert "f32[3,128,256]" in text and "f32[3,256,256]" not in text
