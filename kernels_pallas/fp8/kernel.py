"""Fine-grained quantization and block-scaled matmul Pallas kernels (DeepSeek-V3 report, Sec. 3.3).

* `quantize`: one f32 scale per tile_rows x 128 tile (1 x 128 for activations, 128 x 128 for
  weights), scale = amax / qmax (448 for float8_e4m3fn, 127 for int8), values x / scale rounded to
  nearest (and clipped, since e4m3fn has no infinity).
* `scaled_matmul` / `grouped_scaled_matmul`: the grouped-matmul kernel of `kernels_pallas.gmm`
  with tk = 128 and the scale path on; every 128-deep K block's partial product is multiplied by
  its activation-row and weight-block scales and added to an f32 accumulator. The dense matmul is
  the one-group case, so there is a single matmul kernel to maintain.

Backends: TPU (Mosaic) compiled; CPU with `interpret`. fp8 operands are upcast to bf16 in the
kernel (exact), so chips without fp8 MXUs run it too; no GPU lowering (see kernels_pallas.gmm).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.fp8.reference import BLOCK, QUANT_FORMATS, cast_scaled, compute_scale
from kernels_pallas.gmm import kernel as gmm_kernel


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per quantize step (activations) and the matmul's row / column tiles (tk is 128)."""

    rows: int = 128
    tm: int = 128
    tn: int = 128


def _quantize_kernel(x_ref, q_ref, s_ref, *, tile_rows, fmt, pow2_scale):
    br, c = x_ref.shape
    lane = lax.broadcasted_iota(jnp.int32, (br // tile_rows, c // BLOCK), 1)
    scales = jnp.zeros((br // tile_rows, c // BLOCK), jnp.float32)
    for j in range(c // BLOCK):
        x = x_ref[:, j * BLOCK : (j + 1) * BLOCK].astype(jnp.float32)  # [br, 128]
        amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [br, 1]
        if tile_rows > 1:  # weights: br == tile_rows, one scale for the whole block
            amax = jnp.max(amax, axis=0, keepdims=True)  # [1, 1]
        scale = compute_scale(amax, QUANT_FORMATS[fmt][1], pow2_scale)
        q_ref[:, j * BLOCK : (j + 1) * BLOCK] = cast_scaled(x / scale, fmt)
        scales = jnp.where(lane == j, scale, scales)
    s_ref[...] = scales


@functools.partial(jax.jit, static_argnames=("tile_rows", "fmt", "pow2_scale", "block_sizes", "interpret"))
def quantize(
    x,
    *,
    tile_rows: int,
    fmt: str = "fp8",
    pow2_scale: bool = False,
    block_sizes: BlockSizes = BlockSizes(),
    interpret=False,
):
    """x [r, c] (c % 128 == 0, r % tile_rows == 0) -> (q [r, c], scale [r / tile_rows, c / 128])."""
    r, c = x.shape
    if c % BLOCK or r % tile_rows:
        raise ValueError(f"need columns % 128 == 0 and rows % {tile_rows} == 0, got {x.shape}")
    br = tile_rows if tile_rows > 1 else min(block_sizes.rows, -(-r // 8) * 8)
    rp = -(-r // br) * br
    x = jnp.pad(x, ((0, rp - r), (0, 0)))
    q, s = pl.pallas_call(
        functools.partial(_quantize_kernel, tile_rows=tile_rows, fmt=fmt, pow2_scale=pow2_scale),
        grid=(rp // br,),
        in_specs=[pl.BlockSpec((br, c), lambda i: (i, 0))],
        out_specs=[
            pl.BlockSpec((br, c), lambda i: (i, 0)),
            # 3-D so the block's last two dims are whole array dims (TPU tiling rule).
            pl.BlockSpec((None, br // tile_rows, c // BLOCK), lambda i: (i, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((rp, c), QUANT_FORMATS[fmt][0]),
            jax.ShapeDtypeStruct((rp // br, br // tile_rows, c // BLOCK), jnp.float32),
        ],
        interpret=interpret,
    )(x)
    return q[:r], s.reshape(rp // tile_rows, c // BLOCK)[: r // tile_rows]


def grouped_scaled_matmul(
    x_q,
    x_scale,
    w_q,
    w_scale,
    group_sizes,
    *,
    out_dtype=jnp.float32,
    block_sizes: BlockSizes = BlockSizes(),
    interpret=False,
):
    """x_q [m, k], x_scale [m, k/128], w_q [G, k, n], w_scale [G, k/128, n/128], group_sizes [G]
    -> [m, n] in out_dtype; rows sorted by group, rows past sum(group_sizes) are zero."""
    tiling = gmm_kernel.BlockSizes(tm=block_sizes.tm, tk=BLOCK, tn=block_sizes.tn)
    return gmm_kernel.gmm(
        x_q,
        w_q,
        group_sizes.astype(jnp.int32),
        x_scale,
        w_scale,
        preferred_element_type=out_dtype,
        tiling=tiling,
        interpret=interpret,
    )


def scaled_matmul(
    x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.float32, block_sizes: BlockSizes = BlockSizes(), interpret=False
):
    """x_q [m, k], x_scale [m, k/128], w_q [k, n], w_scale [k/128, n/128] -> [m, n]."""
    one_group = jnp.array([x_q.shape[0]], jnp.int32)
    return grouped_scaled_matmul(
        x_q,
        x_scale,
        w_q[None],
        w_scale[None],
        one_group,
        out_dtype=out_dtype,
        block_sizes=block_sizes,
        interpret=interpret,
    )
