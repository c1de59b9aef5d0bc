"""The Pallas grouped matmul as a differentiable op (custom VJP).

``gmm(lhs, rhs, group_sizes)`` computes, for each group g owning the consecutive rows
[sum(sizes[:g]), sum(sizes[:g+1])) of lhs, out[rows] = lhs[rows] @ rhs[g] (the expert FFN product of
a dropless MoE, DeepSeek-V3 report Sec. 2.1.2 / MegaBlocks). Gradients: d_lhs = gmm(grad, rhs,
transpose_rhs=True) and d_rhs = tgmm(lhs, grad). Backend choice (this kernel, the XLA scan or
``lax.ragged_dot``) is made in one place, ``model/grouped_matmul.py`` via ``kernels_pallas.backend``.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.backend import interpret_default
from kernels_pallas.gmm import kernel
from kernels_pallas.gmm.kernel import BlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret):
    return kernel.gmm(
        lhs,
        rhs,
        group_sizes,
        transpose_rhs=transpose_rhs,
        preferred_element_type=preferred_element_type,
        tiling=tiling,
        interpret=interpret,
    )


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret):
    out = _gmm(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, preferred_element_type, tiling, interpret, res, grad):
    lhs, rhs, group_sizes = res
    d_lhs = kernel.gmm(
        grad,
        rhs,
        group_sizes,
        transpose_rhs=not transpose_rhs,
        preferred_element_type=lhs.dtype,
        tiling=tiling,
        interpret=interpret,
    )  # [m, k]
    d_rhs = kernel.tgmm(
        lhs, grad, group_sizes, preferred_element_type=rhs.dtype, tiling=tiling, interpret=interpret
    )  # [G, k, n]
    if transpose_rhs:
        d_rhs = jnp.swapaxes(d_rhs, 1, 2)  # [G, n, k]
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs,
    rhs,
    group_sizes,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    tiling: BlockSizes = BlockSizes(),
    interpret=None,
):
    """Grouped matmul: lhs [m, k], rhs [G, k, n] (or [G, n, k] with transpose_rhs), group_sizes [G]
    int32 with sum <= m -> [m, n] in preferred_element_type (default lhs.dtype), f32 accumulation.
    Rows past sum(group_sizes) give zeros; empty groups are allowed.

    interpret: None (interpret off TPU), bool, or ``pltpu.InterpretParams()``.
    """
    return _gmm(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        transpose_rhs,
        preferred_element_type,
        tiling,
        interpret_default(interpret),
    )


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling: BlockSizes = BlockSizes(), interpret=None):
    """Grouped weight gradient: out[g] = lhs[rows of g]^T @ grad[rows of g]; lhs [m, k], grad [m, n],
    group_sizes [G] -> [G, k, n] (zeros for empty groups). Not differentiable."""
    return kernel.tgmm(
        lhs,
        grad,
        group_sizes.astype(jnp.int32),
        preferred_element_type=preferred_element_type or lhs.dtype,
        tiling=tiling,
        interpret=interpret_default(interpret),
    )
