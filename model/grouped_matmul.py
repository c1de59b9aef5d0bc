"""Grouped matmul: the activated-FLOPs expert computation (portable XLA path).

``gmm(lhs [m, k], rhs [g, k, n], group_sizes [g]) -> [m, n]``: rows of ``lhs`` are sorted by
group; group ``i`` owns rows ``offsets[i] : offsets[i] + group_sizes[i]`` and multiplies them by
``rhs[i]``. Rows past ``sum(group_sizes)`` are padding and give zeros.

Why not ``jax.lax.ragged_dot``: XLA:CPU lowers it to a dense product over all groups (cost x g).
Here we scan over (row tile, group) work items, megablox-style: a tile of ``tile`` rows is visited
once for each group that owns some of its rows, so the number of visits is at most
``ceil(m / tile) + g - 1`` and the cost is about ``(m + g * tile) * k * n`` instead of ``g * m * k * n``.
Unused visits (empty groups, padding) are skipped with ``lax.cond``. On GPU/TPU, where
``ragged_dot`` is a real grouped kernel, ``gmm`` uses it (see ``impl``). The backward is a
``custom_vjp``: d_lhs = gmm(d_out, rhs^T) and d_rhs = tgmm(lhs, d_out) (per-group lhs^T d_out),
both on the same work items. Dense reference: ``model/moe_reference.py`` and the tests.
"""

import functools

import jax
import jax.numpy as jnp


def _work_items(group_sizes: jax.Array, m: int, tile: int):
    """Static-length list of (group, tile) visits. Returns group_id, tile_id, valid [w], starts, ends [g]."""
    g = group_sizes.shape[0]
    n_tiles = -(-m // tile)
    n_items = n_tiles + g - 1
    ends = jnp.cumsum(group_sizes)  # [g]
    starts = ends - group_sizes
    nonempty = group_sizes > 0
    first = starts // tile
    last = jnp.where(nonempty, (ends - 1) // tile, first - 1)
    visits = jnp.where(nonempty, last - first + 1, 0)  # tiles each group touches
    item_end = jnp.cumsum(visits)  # [g] one past the last item of each group
    item_start = item_end - visits
    idx = jnp.arange(n_items)
    # Item i belongs to the first group whose items end after i (empty groups end where they start).
    group_id = jnp.clip(jnp.searchsorted(item_end, idx, side="right"), 0, g - 1)
    tile_id = first[group_id] + (idx - item_start[group_id])
    valid = idx < item_end[-1]
    tile_id = jnp.where(valid, jnp.clip(tile_id, 0, n_tiles - 1), 0)
    return group_id.astype(jnp.int32), tile_id.astype(jnp.int32), valid, starts, ends


def _row_mask(tile_idx, g, starts, ends, tile, valid):
    rows = tile_idx * tile + jnp.arange(tile)  # [tile]
    return (rows >= starts[g]) & (rows < ends[g]) & valid


def _gmm_scan(lhs, rhs, group_sizes, tile, transpose_rhs, out_dtype):
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_tiles = -(-m // tile)
    pad = n_tiles * tile - m
    lhs_p = jnp.pad(lhs, ((0, pad), (0, 0)))
    gid, tid, valid, starts, ends = _work_items(group_sizes, m, tile)

    def body(out, item):
        g, t, ok = item

        def visit(out):
            x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)  # [tile, k]
            w = rhs[g]  # [k, n] or [n, k]
            y = jnp.einsum("mk,nk->mn" if transpose_rhs else "mk,kn->mn", x, w,
                           preferred_element_type=jnp.float32)  # [tile, n]
            y = jnp.where(_row_mask(t, g, starts, ends, tile, ok)[:, None], y, 0.0)
            cur = jax.lax.dynamic_slice_in_dim(out, t * tile, tile, 0)
            return jax.lax.dynamic_update_slice_in_dim(out, cur + y, t * tile, 0)

        return jax.lax.cond(ok, visit, lambda o: o, out), None

    out0 = jnp.zeros((n_tiles * tile, n), jnp.float32)
    out, _ = jax.lax.scan(body, out0, (gid, tid, valid))
    return out[:m].astype(out_dtype)


def _tgmm_scan(lhs, grad, group_sizes, tile, out_dtype):
    """Per-group lhs^T @ grad: [m, k], [m, n] -> [g, k, n]."""
    m, k = lhs.shape
    n = grad.shape[1]
    g_count = group_sizes.shape[0]
    n_tiles = -(-m // tile)
    pad = n_tiles * tile - m
    lhs_p = jnp.pad(lhs, ((0, pad), (0, 0)))
    grad_p = jnp.pad(grad, ((0, pad), (0, 0)))
    gid, tid, valid, starts, ends = _work_items(group_sizes, m, tile)

    def body(acc, item):
        g, t, ok = item

        def visit(acc):
            x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)  # [tile, k]
            dy = jax.lax.dynamic_slice_in_dim(grad_p, t * tile, tile, 0)  # [tile, n]
            dy = jnp.where(_row_mask(t, g, starts, ends, tile, ok)[:, None], dy, 0)
            dw = jnp.einsum("mk,mn->kn", x, dy, preferred_element_type=jnp.float32)  # [k, n]
            return acc.at[g].add(dw)

        return jax.lax.cond(ok, visit, lambda a: a, acc), None

    acc, _ = jax.lax.scan(body, jnp.zeros((g_count, k, n), jnp.float32), (gid, tid, valid))
    return acc.astype(out_dtype)


def _use_ragged_dot() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


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


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 64,
        impl: str = "auto") -> jax.Array:
    """Grouped matmul [m, k] x [g, k, n] -> [m, n]; see the module docstring.

    impl: "scan" (tiled scan, any backend), "ragged_dot" (XLA's grouped op; dense on CPU), or
    "auto" (ragged_dot on GPU/TPU, scan on CPU).
    """
    if impl == "auto":
        impl = "ragged_dot" if _use_ragged_dot() else "scan"
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if impl != "scan":
        raise ValueError(f"gmm impl must be auto|scan|ragged_dot, got {impl!r}")
    return _gmm(lhs, rhs, group_sizes, tile)
