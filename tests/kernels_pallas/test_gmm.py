"""Grouped matmul kernel (interpret mode) vs the dense-loop reference, forward and VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gmm import BlockSizes, gmm, gmm_reference, tgmm, tgmm_reference
from model import grouped_matmul
from tests.tolerances import assert_close

# (m, k, n, G, tiling): k != n, m not a multiple of tm in the first, tn > n in the last. Few distinct
# shapes keep the interpret-mode compiles cheap; group sizes are runtime data and vary freely.
SHAPES = [
    (40, 48, 80, 4, BlockSizes(16, 16, 32)),
    (64, 32, 24, 3, BlockSizes(32, 32, 8)),
    (24, 16, 40, 6, BlockSizes(8, 8, 64)),
]


@st.composite
def group_sizes_st(draw, m, g):
    """Group sizes with sum <= m: cuts drawn in [0, m]; modes force empty / full / padded layouts."""
    mode = draw(st.sampled_from(["random", "one_full", "all_empty", "aligned"]))
    if mode == "one_full":
        sizes = np.zeros(g, np.int32)
        sizes[draw(st.integers(0, g - 1))] = m
        return sizes
    if mode == "all_empty":
        return np.zeros(g, np.int32)
    cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g, max_size=g)))
    if mode == "aligned":
        cuts = [c // 8 * 8 for c in cuts]
    return np.diff(np.array([0] + cuts)).astype(np.int32)


def _inputs(m, k, n, g, dtype, transpose_rhs, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    rhs_shape = (g, n, k) if transpose_rhs else (g, k, n)
    rhs = (jax.random.normal(k2, rhs_shape, jnp.float32) / np.sqrt(k)).astype(dtype)
    cot = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, cot


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    transpose_rhs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gmm_forward_and_vjp_match_reference(data, shape, dtype, transpose_rhs, seed):
    m, k, n, g, tiling = shape
    sizes = jnp.asarray(data.draw(group_sizes_st(m, g)))
    lhs, rhs, cot = _inputs(m, k, n, g, dtype, transpose_rhs, seed)
    kern = lambda a, b: gmm(a, b, sizes, transpose_rhs=transpose_rhs, tiling=tiling)
    ref = lambda a, b: gmm_reference(a, b, sizes, transpose_rhs=transpose_rhs)
    out, vjp = jax.vjp(kern, lhs, rhs)
    out_ref, vjp_ref = jax.vjp(ref, lhs, rhs)
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, composite=True)
    padding = int(sizes.sum())
    assert not np.asarray(out[padding:], np.float32).any(), "padding rows must be zero"
    for got, want in zip(vjp(cot), vjp_ref(cot)):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype, composite=True)


@pytest.mark.parametrize(
    "sizes", [[0, 0, 0, 0], [40, 0, 0, 0], [0, 0, 0, 40], [0, 7, 0, 20], [1, 1, 1, 1], [15, 1, 16, 8]]
)
def test_gmm_edge_groups_and_xla_path(sizes):
    m, k, n, g, tiling = SHAPES[0]
    sizes = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, cot = _inputs(m, k, n, g, jnp.float32, False, 0)
    want = gmm_reference(lhs, rhs, sizes)
    assert_close(gmm(lhs, rhs, sizes, tiling=tiling), want, composite=True)
    for impl in ("ragged_dot", "scan"):
        assert_close(grouped_matmul.gmm(lhs, rhs, sizes, impl=impl, tile=8), want, composite=True, err_msg=impl)
    d_rhs = tgmm(lhs, cot, sizes, tiling=tiling)  # [G, k, n]
    assert_close(d_rhs, tgmm_reference(lhs, cot, sizes), composite=True)
    for impl in ("ragged_dot", "scan"):  # the XLA backends' weight gradient (the scan's is its own tgmm)
        d_rhs_xla = jax.vjp(lambda w: grouped_matmul.gmm(lhs, w, sizes, impl=impl, tile=8), rhs)[1](cot)[0]
        assert_close(d_rhs_xla, tgmm_reference(lhs, cot, sizes), composite=True, err_msg=impl)
    assert not np.asarray(d_rhs)[np.asarray(sizes) == 0].any(), "empty groups get zero gradient"


def test_gmm_tpu_interpreter():
    """The TPU-semantics interpreter (scalar prefetch, VMEM scratch) runs the kernel too."""
    m, k, n, g, tiling = SHAPES[1]
    sizes = jnp.asarray([10, 0, 30], jnp.int32)
    lhs, rhs, _ = _inputs(m, k, n, g, jnp.float32, False, 1)
    out = gmm(lhs, rhs, sizes, tiling=tiling, interpret=pltpu.InterpretParams())
    assert_close(out, gmm_reference(lhs, rhs, sizes), composite=True)
