"""Grouped matmul Pallas kernels: `gmm` (per-group lhs @ rhs[g]) and `tgmm` (per-group lhs^T @ grad).

Megablox-style (jax `pallas/ops/tpu/megablox/gmm.py`, written afresh): rows of `lhs` are sorted by
group, so group g owns rows [offsets[g], offsets[g+1]). A row tile may straddle several groups;
the grid therefore walks a work list of (row tile, group) pairs, computed on the host side of the
kernel and passed by scalar prefetch. Each pair multiplies the whole tile and keeps only the rows
of its group. Rows past sum(group_sizes) form an extra "padding group" whose output is zero.

Backends: TPU (Mosaic) compiled; CPU only with `interpret` (True or `pltpu.InterpretParams()`).
There is no GPU lowering: Triton has no scalar prefetch; `ops.gmm` uses `lax.ragged_dot` there.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: rows (tm), contraction (tk), output columns (tn). Clamped to the problem size."""

    tm: int = 128
    tk: int = 128
    tn: int = 128


def _round_up(x: int, t: int) -> int:
    return -(-x // t) * t


def make_group_metadata(group_sizes, m: int, tm: int, *, visit_empty: bool):
    """Work list for the grid over (row tile, group) pairs.

    Args:
      group_sizes: [G] int32, sum <= m.
      m: rows of lhs, a multiple of tm.
      tm: row tile.
      visit_empty: give every empty group one work item (tgmm must zero its output block) and none
        to the padding group (tgmm has no output for it). gmm instead skips empty groups and visits
        the padding group so that padding rows are written as zeros.

    Returns:
      offsets [G+2] (row where each group starts; group G is padding), group_ids [W], tile_ids [W],
      num_items [1]. W = m/tm + G is a static bound; items past num_items repeat the last real one,
      so the output block index never jumps to an unwritten block.
    """
    g = group_sizes.shape[0]
    tiles_m = m // tm
    group_sizes = group_sizes.astype(jnp.int32)
    sizes = jnp.concatenate([group_sizes, (m - jnp.sum(group_sizes))[None]])  # [G+1]
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)])  # [G+2]
    first = jnp.minimum(offsets[:-1] // tm, tiles_m - 1)  # [G+1] first tile touched
    last = (offsets[1:] + tm - 1) // tm  # [G+1] one past the last tile touched
    n_items = jnp.where(sizes > 0, last - first, int(visit_empty))  # [G+1]
    if visit_empty:
        n_items = n_items.at[g].set(0)
    item_end = jnp.cumsum(n_items)  # [G+1]
    num_items = item_end[-1]
    # Bound: a nonempty group spans at most (its tiles + 1 shared boundary tile), so the total is at
    # most tiles_m + (#groups - 1) with the padding group, or tiles_m + G - 1 with empty visits.
    w = tiles_m + g
    i = jnp.minimum(jnp.arange(w, dtype=jnp.int32), num_items - 1)  # [W]
    group_ids = jnp.searchsorted(item_end, i, side="right").astype(jnp.int32)  # [W]
    tile_ids = first[group_ids] + i - (item_end - n_items)[group_ids]  # [W]
    tile_ids = jnp.minimum(tile_ids, tiles_m - 1).astype(jnp.int32)
    return offsets.astype(jnp.int32), group_ids, tile_ids, num_items.astype(jnp.int32)[None]


def mxu_dot(a, b, contract):
    """f32-accumulating dot_general. float8 operands are upcast to bf16 first, which is exact (e4m3
    and e5m2 values are bf16 values) and runs on MXUs without fp8 support; int8 accumulates in int32."""
    dims = (contract, ((), ()))
    if a.dtype == jnp.int8 and b.dtype == jnp.int8:
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    if jnp.dtype(a.dtype).itemsize == 1:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=jnp.float32)


def _gmm_kernel(
    offsets, group_ids, tile_ids, num_items, lhs_ref, rhs_ref, *refs, tm, num_groups, num_k, transpose_rhs, scaled
):
    if scaled:
        lhs_scale_ref, rhs_scale_ref, out_ref, acc_ref = refs
    else:
        out_ref, acc_ref = refs
    i, k_i = pl.program_id(1), pl.program_id(2)
    g = group_ids[i]
    valid = i < num_items[0]

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid & (g < num_groups))  # the padding group only stores zeros
    def _accumulate():
        part = mxu_dot(lhs_ref[...], rhs_ref[...], ((1,), (1 if transpose_rhs else 0,)))  # [tm, tn]
        if scaled:  # dequantize once per K block: [tm, 1] * [1, tn] scales
            part = part * lhs_scale_ref[...] * rhs_scale_ref[...]
        acc_ref[...] += part

    @pl.when(valid & (k_i == num_k - 1))
    def _store():
        rows = tile_ids[i] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)  # [tm, tn]
        mine = (rows >= offsets[g]) & (rows < offsets[g + 1])
        out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "preferred_element_type", "tiling", "interpret"))
def gmm(
    lhs,
    rhs,
    group_sizes,
    lhs_scale=None,
    rhs_scale=None,
    *,
    transpose_rhs=False,
    preferred_element_type=None,
    tiling=BlockSizes(),
    interpret=False,
):
    """out[r] = lhs[r] @ rhs[g(r)] for rows r of group g; rows past sum(group_sizes) are zero.

    Args:
      lhs: [m, k]. rhs: [G, k, n], or [G, n, k] with transpose_rhs. group_sizes: [G] int32.
      lhs_scale, rhs_scale: optional block scales for quantized operands (fp8/int8): lhs_scale
        [m, k/128], rhs_scale [G, k/128, n/128] (or [G, k/128, n]: per column); each 128-deep K block's partial product is scaled
        before it is added to the f32 accumulator (DeepSeek-V3 report, Sec. 3.3). Needs tk == 128.
      preferred_element_type: output dtype, default lhs.dtype. Accumulation is always f32.
    Returns:
      [m, n].
    """
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = preferred_element_type or lhs.dtype
    scaled = lhs_scale is not None
    tm = min(tiling.tm, _round_up(m, 8))
    tk = min(tiling.tk, k)
    tn = min(tiling.tn, n)
    if scaled and (tk != 128 or k % 128 or n % 128):
        raise ValueError(f"scaled gmm needs tk == 128 and k, n multiples of 128; got {tk=}, {k=}, {n=}")
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))  # zero K padding adds nothing to the dot
    rhs_pad = ((0, 0), (0, np_ - n), (0, kp - k)) if transpose_rhs else ((0, 0), (0, kp - k), (0, np_ - n))
    rhs = jnp.pad(rhs, rhs_pad)
    meta = make_group_metadata(group_sizes, mp, tm, visit_empty=False)
    grid = (np_ // tn, meta[1].shape[0], kp // tk)

    def lhs_map(n_i, i, k_i, offsets, group_ids, tile_ids, num_items):
        return tile_ids[i], k_i

    def rhs_map(n_i, i, k_i, offsets, group_ids, tile_ids, num_items):
        g = jnp.minimum(group_ids[i], num_groups - 1)
        return (g, n_i, k_i) if transpose_rhs else (g, k_i, n_i)

    def out_map(n_i, i, k_i, offsets, group_ids, tile_ids, num_items):
        return tile_ids[i], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_specs = [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)]
    operands = [lhs, rhs]
    if scaled:
        # Lay the scales out so one K block is a [tm, 1] column and a [1, tn] row (TPU block rules).
        lhs_scale = jnp.pad(lhs_scale.T, ((0, 0), (0, mp - m)))[:, :, None]  # [k/128, mp, 1]
        rhs_scale = (rhs_scale if rhs_scale.shape[-1] == n else jnp.repeat(rhs_scale, 128, axis=2))[:, :, None, :]  # [G, k/128, 1, n]
        in_specs += [
            pl.BlockSpec((None, tm, 1), lambda n_i, i, k_i, o, g, t, c: (k_i, t[i], 0)),
            pl.BlockSpec(
                (None, None, 1, tn), lambda n_i, i, k_i, o, g, t, c: (jnp.minimum(g[i], num_groups - 1), k_i, 0, n_i)
            ),
        ]
        operands += [lhs_scale.astype(jnp.float32), rhs_scale.astype(jnp.float32)]
    kernel = functools.partial(
        _gmm_kernel, tm=tm, num_groups=num_groups, num_k=grid[2], transpose_rhs=transpose_rhs, scaled=scaled
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(*meta, *operands)
    return out[:m, :n]


def _tgmm_kernel(offsets, group_ids, tile_ids, num_items, lhs_ref, grad_ref, out_ref, acc_ref, *, tm):
    i = pl.program_id(2)
    g = group_ids[i]

    @pl.when((i == 0) | (g != group_ids[jnp.maximum(i - 1, 0)]))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(i < num_items[0])
    def _accumulate():
        rows = tile_ids[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)  # [tm, 1]
        mine = (rows >= offsets[g]) & (rows < offsets[g + 1])
        x = jnp.where(mine, lhs_ref[...], 0).astype(lhs_ref.dtype)  # [tm, tk]
        dy = jnp.where(mine, grad_ref[...], 0).astype(grad_ref.dtype)  # [tm, tn]
        acc_ref[...] += mxu_dot(x, dy, ((0,), (0,)))  # [tk, tn]
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)  # empty groups store their zero block


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "interpret"))
def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling=BlockSizes(), interpret=False):
    """out[g] = sum over rows r of group g of outer(lhs[r], grad[r]): the weight gradient of gmm.

    Args: lhs [m, k], grad [m, n], group_sizes [G] int32. Returns [G, k, n]; empty groups give zeros.
    """
    m, k = lhs.shape
    n = grad.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    tm = min(tiling.tm, _round_up(m, 8))
    tk, tn = min(tiling.tk, k), min(tiling.tn, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    grad = jnp.pad(grad, ((0, mp - m), (0, np_ - n)))
    meta = make_group_metadata(group_sizes, mp, tm, visit_empty=True)
    grid = (kp // tk, np_ // tn, meta[1].shape[0])
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=grid,
            in_specs=[
                pl.BlockSpec((tm, tk), lambda k_i, n_i, i, o, g, t, c: (t[i], k_i)),
                pl.BlockSpec((tm, tn), lambda k_i, n_i, i, o, g, t, c: (t[i], n_i)),
            ],
            out_specs=pl.BlockSpec((None, tk, tn), lambda k_i, n_i, i, o, g, t, c: (g[i], k_i, n_i)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*meta, lhs, grad)
    return out[:, :k, :n]
