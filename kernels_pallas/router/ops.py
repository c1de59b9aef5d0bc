"""Public fused router with a custom VJP and backend dispatch.

`route(logits, bias, cfg)` implements DeepSeek-V3's gate (report Sec. 2.1.2; semantics in
`reference.py`). Backward: only gates carry gradient, d gates / d logits through the score
function at the selected experts; the selection (top-k, group limit) and the bias get none.

impl: "pallas" (kernel; compiled on TPU, interpreted elsewhere when interpret is None), "xla"
(the jnp reference, differentiated by JAX), "auto" (pallas on TPU, xla elsewhere).
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.gmm.ops import resolve_impl
from kernels_pallas.router import kernel
from kernels_pallas.router.kernel import BlockSizes
from kernels_pallas.router.reference import RouterConfig, gates_from_ids, route_reference, scores_fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _route(logits, bias, cfg, block_sizes, interpret):
  return kernel.route(logits, bias, cfg=cfg, block_sizes=block_sizes, interpret=interpret)


def _route_fwd(logits, bias, cfg, block_sizes, interpret):
  ids, gates, counts = _route(logits, bias, cfg, block_sizes, interpret)
  return (ids, gates, counts), (logits, bias, ids)


def _route_bwd(cfg, block_sizes, interpret, res, cotangents):
  logits, bias, ids = res
  d_gates = cotangents[1]  # ids and counts are integers: no cotangent
  _, vjp = jax.vjp(lambda x: gates_from_ids(scores_fn(x, cfg), ids, cfg), logits)
  (d_logits,) = vjp(d_gates)
  return d_logits.astype(logits.dtype), jnp.zeros_like(bias)


_route.defvjp(_route_fwd, _route_bwd)


def route(logits, bias, cfg: RouterConfig, *, return_permutation: bool = False,
          block_sizes: BlockSizes = BlockSizes(), interpret=None, impl: str = "auto"):
  """logits [t, e] (f32), bias [e] -> (ids [t, k] int32, gates [t, k] f32, counts [e] int32), plus
  with return_permutation the stable argsort of ids.reshape(-1) [t*k] (sorts assignments by expert
  for dispatch; assignment a belongs to token a // k)."""
  impl, interpret = resolve_impl(impl, interpret)
  if impl == "xla":
    ids, gates, counts = route_reference(logits, bias, cfg)
  else:
    ids, gates, counts = _route(logits, bias, cfg, block_sizes, interpret)
  if not return_permutation:
    return ids, gates, counts
  return ids, gates, counts, jnp.argsort(ids.reshape(-1), stable=True).astype(jnp.int32)
