"""Grouped matmul: the activated-FLOPs expert computation, one entry point for every backend.

``gmm(lhs [m, k], rhs [g, k, n], group_sizes [g], impl=...) -> [m, n]``: rows of ``lhs`` are sorted
by group; group ``i`` owns rows ``offsets[i] : offsets[i] + group_sizes[i]`` and multiplies them by
``rhs[i]``. Rows past ``sum(group_sizes)`` are padding and give zeros.

``impl`` (``kernels_pallas/backend.py``, resolved there): "pallas" (``kernels_pallas/gmm``),
"ragged_dot" (``jax.lax.ragged_dot``: a real grouped kernel on GPU/TPU, but XLA:CPU lowers it to a
dense product over all groups, cost x g), "scan" (below), "auto".

"scan": megablox's work list (``kernels_pallas.gmm.kernel.make_group_metadata``, the same function
the Pallas kernel walks) as a ``lax.scan`` over (row tile, group) items: a tile of ``tile`` rows is
visited once for each group that owns some of its rows, at most ``ceil(m / tile) + g`` visits, cost
about ``(m + g * tile) * k * n`` instead of ``g * m * k * n``. Unused items (past the list, the
padding group) are skipped with ``lax.cond``. Backward (``custom_vjp``): d_lhs = gmm(d_out, rhs^T)
and d_rhs = per-group lhs^T d_out on the same work list. Dense reference:
``kernels_pallas/gmm/reference.py``.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import backend
from kernels_pallas.fp8 import grouped_fp8_matmul, grouped_prequantized_matmul
from kernels_pallas.gmm import ops as pallas_gmm
from kernels_pallas.gmm.kernel import make_group_metadata
from model.linear import RECIPES, QuantizedWeight, dequantize


def _work_list(group_sizes, m: int, tile: int):
    """(offsets [g+2], group_ids [w], tile_ids [w], valid [w]) for rows padded to a multiple of tile."""
    g = group_sizes.shape[0]
    offsets, gid, tid, num = make_group_metadata(group_sizes, m, tile, visit_empty=False)
    valid = (jnp.arange(gid.shape[0]) < num[0]) & (gid < g)  # real items of real groups
    return offsets, gid, tid, valid


def _rows_of(offsets, g, t, tile):
    rows = t * tile + jnp.arange(tile)  # [tile]
    return (rows >= offsets[g]) & (rows < offsets[g + 1])


def _gmm_scan(lhs, rhs, group_sizes, tile, transpose_rhs, out_dtype):
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    mp = -(-m // tile) * tile
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    offsets, gid, tid, valid = _work_list(group_sizes, mp, tile)

    def body(out, item):
        g, t, ok = item

        def visit(out):
            x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)  # [tile, k]
            y = jnp.einsum(
                "mk,nk->mn" if transpose_rhs else "mk,kn->mn", x, rhs[g], preferred_element_type=jnp.float32
            )  # [tile, n]
            y = jnp.where(_rows_of(offsets, g, t, tile)[:, None], y, 0.0)
            cur = jax.lax.dynamic_slice_in_dim(out, t * tile, tile, 0)
            return jax.lax.dynamic_update_slice_in_dim(out, cur + y, t * tile, 0)

        return jax.lax.cond(ok, visit, lambda o: o, out), None

    out, _ = jax.lax.scan(body, jnp.zeros((mp, n), jnp.float32), (gid, tid, valid))
    return out[:m].astype(out_dtype)


def _tgmm_scan(lhs, grad, group_sizes, tile, out_dtype):
    """Per-group lhs^T @ grad: [m, k], [m, n] -> [g, k, n] (zeros for empty groups)."""
    m, k = lhs.shape
    n = grad.shape[1]
    mp = -(-m // tile) * tile
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    grad_p = jnp.pad(grad, ((0, mp - m), (0, 0)))
    offsets, gid, tid, valid = _work_list(group_sizes, mp, tile)

    def body(acc, item):
        g, t, ok = item

        def visit(acc):
            x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)  # [tile, k]
            dy = jax.lax.dynamic_slice_in_dim(grad_p, t * tile, tile, 0)  # [tile, n]
            dy = jnp.where(_rows_of(offsets, g, t, tile)[:, None], dy, 0)
            return acc.at[g].add(jnp.einsum("mk,mn->kn", x, dy, preferred_element_type=jnp.float32))

        return jax.lax.cond(ok, visit, lambda a: a, acc), None

    acc, _ = jax.lax.scan(body, jnp.zeros((group_sizes.shape[0], k, n), jnp.float32), (gid, tid, valid))
    return acc.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, tile):
    return _gmm_scan(lhs, rhs, group_sizes, tile, False, lhs.dtype)


def _gmm_fwd(lhs, rhs, group_sizes, tile):
    return _gmm(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _gmm_bwd(tile, res, d_out):
    lhs, rhs, group_sizes = res
    d_lhs = _gmm_scan(d_out, rhs, group_sizes, tile, True, lhs.dtype)  # [m, k]
    d_rhs = _tgmm_scan(lhs, d_out, group_sizes, tile, rhs.dtype)  # [g, k, n]
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array, rhs, group_sizes: jax.Array, *, impl: str = "auto", tile: int = 64, recipe: str = "bf16"
) -> jax.Array:
    """Grouped matmul [m, k] x [g, k, n] -> [m, n] in lhs.dtype (f32 accumulation); see the module
    docstring. ``tile``: rows per work item of the "scan" backend. ``recipe`` (``model/linear.py``):
    "fp8" / "int8" quantize all three products (``kernels_pallas.fp8.grouped_fp8_matmul``: the
    block-scaled Pallas kernel for impl "pallas", else this backend's product of the dequantized
    operands in f32, the same sums up to f32 rounding).

    ``rhs`` may be a ``QuantizedWeight`` (q [g, k, n] e4m3, scale [g, ceil(k/128), ceil(n/128)]: each
    expert's 128x128 blocks, e.g. DeepSeek's FP8 experts kept as stored, ``model/fp8_weights.py``): as
    ``linear`` does, under "fp8" / "int8" it is multiplied as stored
    (``kernels_pallas.fp8.grouped_prequantized_matmul``: inference, no gradient reaches it), under
    "bf16" dequantized first."""
    group_sizes = group_sizes.astype(jnp.int32)
    impl = backend.resolve(impl)
    if recipe not in RECIPES:
        raise ValueError(f"gmm: recipe must be one of {RECIPES}, got {recipe!r}")
    if isinstance(rhs, QuantizedWeight) and recipe == "bf16":
        rhs = jax.vmap(lambda q, s: dequantize(QuantizedWeight(q, s), 1, lhs.dtype))(rhs.q, rhs.scale)  # [g, k, n]
    if recipe != "bf16":
        product = None if impl == "pallas" else functools.partial(_f32_product, impl=impl, tile=tile)
        kw = dict(fmt=recipe, out_dtype=lhs.dtype, impl="pallas" if impl == "pallas" else "xla", product=product)
        if isinstance(rhs, QuantizedWeight):
            return grouped_prequantized_matmul(lhs, rhs.q, rhs.scale, group_sizes, **kw)
        return grouped_fp8_matmul(lhs, rhs, group_sizes, **kw)
    if impl == "pallas":
        return pallas_gmm.gmm(lhs, rhs, group_sizes)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)
    return _gmm(lhs, rhs, group_sizes, tile)


def _f32_product(lhs, rhs, group_sizes, *, impl, tile):
    """The bf16 path's product on f32 operands (the quantized recipe's XLA engine)."""
    return gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes, impl=impl, tile=tile)
