"""Public grouped matmul with a custom VJP and backend dispatch.

`gmm(lhs, rhs, group_sizes)` computes, for each group g owning the consecutive rows
[sum(sizes[:g]), sum(sizes[:g+1])) of lhs, out[rows] = lhs[rows] @ rhs[g] (the expert FFN product of
a dropless MoE, DeepSeek-V3 report Sec. 2.1.2 / MegaBlocks). Gradients (custom_vjp):
d_lhs = gmm(grad, rhs, transpose_rhs=True) and d_rhs = tgmm(lhs, grad).

impl: "pallas" (the kernel; compiled on TPU, interpreted elsewhere when interpret is None),
"xla" (`jax.lax.ragged_dot`, differentiated by JAX), "auto" (pallas on TPU, xla on GPU and CPU:
the kernel needs scalar prefetch, which the Triton / Mosaic-GPU lowerings do not have).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.gmm import kernel
from kernels_pallas.gmm.kernel import BlockSizes


def resolve_impl(impl: str, interpret):
  """(impl, interpret) for the current backend: Pallas kernels run compiled only on TPU."""
  on_tpu = jax.default_backend() == "tpu"
  if impl == "auto":
    impl = "pallas" if on_tpu else "xla"
  if impl not in ("pallas", "xla"):
    raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
  if interpret is None:
    interpret = not on_tpu
  return impl, interpret


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret):
  return kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                    preferred_element_type=preferred_element_type, tiling=tiling, interpret=interpret)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret):
  out = _gmm(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, preferred_element_type, tiling, interpret, res, grad):
  lhs, rhs, group_sizes = res
  d_lhs = kernel.gmm(grad, rhs, group_sizes, transpose_rhs=not transpose_rhs,
                     preferred_element_type=lhs.dtype, tiling=tiling, interpret=interpret)  # [m, k]
  d_rhs = kernel.tgmm(lhs, grad, group_sizes, preferred_element_type=rhs.dtype, tiling=tiling,
                      interpret=interpret)  # [G, k, n]
  if transpose_rhs:
    d_rhs = jnp.swapaxes(d_rhs, 1, 2)  # [G, n, k]
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, preferred_element_type=None,
        tiling: BlockSizes = BlockSizes(), interpret=None, impl: str = "auto"):
  """Grouped matmul: lhs [m, k], rhs [G, k, n] (or [G, n, k] with transpose_rhs), group_sizes [G]
  int32 with sum <= m -> [m, n] in preferred_element_type (default lhs.dtype), f32 accumulation.
  Rows past sum(group_sizes) give zeros; empty groups are allowed.

  interpret: None (interpret off TPU), bool, or `pltpu.InterpretParams()`.
  """
  impl, interpret = resolve_impl(impl, interpret)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "xla":
    if transpose_rhs:
      rhs = jnp.swapaxes(rhs, 1, 2)
    out_dtype = preferred_element_type or lhs.dtype
    return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(out_dtype)
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type, tiling, interpret)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling: BlockSizes = BlockSizes(),
         interpret=None, impl: str = "auto"):
  """Grouped weight gradient: out[g] = lhs[rows of g]^T @ grad[rows of g]; lhs [m, k], grad [m, n],
  group_sizes [G] -> [G, k, n] (zeros for empty groups). Not differentiable on the pallas path."""
  impl, interpret = resolve_impl(impl, interpret)
  group_sizes = group_sizes.astype(jnp.int32)
  out_dtype = preferred_element_type or lhs.dtype
  if impl == "xla":
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    out = lax.ragged_dot_general(lhs, grad, group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)
  return kernel.tgmm(lhs, grad, group_sizes, preferred_element_type=out_dtype, tiling=tiling,
                     interpret=interpret)
