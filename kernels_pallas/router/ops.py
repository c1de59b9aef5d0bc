"""The fused Pallas router as a differentiable op (custom VJP).

``route(logits, bias, cfg, valid)`` implements DeepSeek's gate (report Sec. 2.1.2; semantics in
``reference.py``). Backward: only gates carry gradient, d gates / d logits through the score
function at the selected experts; the selection (top-k, group limit) and the bias get none.
``model/router.py`` chooses between this kernel and the jnp reference (``kernels_pallas.backend``).
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.backend import interpret_default
from kernels_pallas.router import kernel
from kernels_pallas.router.kernel import BlockSizes
from kernels_pallas.router.reference import RouterConfig, gates_from_ids, scores_fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _route(logits, bias, valid, cfg, block_sizes, interpret):
    return kernel.route(logits, bias, valid, cfg=cfg, block_sizes=block_sizes, interpret=interpret)


def _route_fwd(logits, bias, valid, cfg, block_sizes, interpret):
    ids, gates, counts = _route(logits, bias, valid, cfg, block_sizes, interpret)
    return (ids, gates, counts), (logits, bias, valid, ids)


def _route_bwd(cfg, block_sizes, interpret, res, cotangents):
    logits, bias, valid, ids = res
    d_gates = cotangents[1]  # ids and counts are integers: no cotangent
    _, vjp = jax.vjp(lambda x: gates_from_ids(scores_fn(x, cfg), ids, cfg), logits)
    (d_logits,) = vjp(d_gates)
    return d_logits.astype(logits.dtype), jnp.zeros_like(bias), None


_route.defvjp(_route_fwd, _route_bwd)


def route(logits, bias, cfg: RouterConfig, valid=None, *, block_sizes: BlockSizes = BlockSizes(), interpret=None):
    """logits [t, e] (f32), bias [e], valid [t] bool (default all) -> (ids [t, k] int32, gates [t, k]
    f32, counts [e] int32 over the valid tokens)."""
    valid = jnp.ones(logits.shape[:1], bool) if valid is None else valid
    return _route(logits, bias, valid, cfg, block_sizes, interpret_default(interpret))
