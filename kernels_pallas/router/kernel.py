"""Fused router Pallas kernel: scores, bias, group limit, top-k, gates and per-expert counts for a
block of tokens in one pass over the [bt, e] logits (semantics in ``reference.py``).

Only elementwise ops and lane reductions (max/min/sum) are used: top-k is k rounds of
"max, then the lowest index attaining it", so ties resolve like ``lax.top_k``; the group limit ranks
n_group scalars per token pairwise. No reshapes or sorts, which keeps Mosaic lowering simple.

Backends: TPU (Mosaic) compiled; CPU with ``interpret``. Nothing TPU-specific is used, so a
Triton lowering on GPU is plausible, but it is untested and ``kernels_pallas.backend`` does not
select it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.router.reference import RouterConfig


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tokens per grid step (the expert axis is never split)."""

    bt: int = 128


def _first_max(x, lane, e):
    """Row max [bt, 1] and the lowest lane attaining it [bt, 1]."""
    mx = jnp.max(x, axis=1, keepdims=True)
    return mx, jnp.min(jnp.where(x == mx, lane, e), axis=1, keepdims=True)


def _router_kernel(logits_ref, bias_ref, valid_ref, ids_ref, gates_ref, counts_ref, *, cfg: RouterConfig):
    logits = logits_ref[...].astype(jnp.float32)  # [bt, e]
    bt, e = logits.shape
    if cfg.score_fn == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        z = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
        scores = z / jnp.sum(z, axis=1, keepdims=True)  # [bt, e]
    choice = scores + bias_ref[...].astype(jnp.float32)  # [bt, e]
    lane = lax.broadcasted_iota(jnp.int32, (bt, e), 1)
    neg_inf = jnp.float32(-jnp.inf)

    if cfg.n_group > 1:
        group_of = lane // (e // cfg.n_group)  # [bt, e]
        group_scores = []
        for h in range(cfg.n_group):  # [bt, 1] each: top-1 (+ top-2) choice in group h
            c = jnp.where(group_of == h, choice, neg_inf)
            top1, arg1 = _first_max(c, lane, e)
            if cfg.group_score == "top2_sum":
                top1 = top1 + jnp.max(jnp.where(lane == arg1, neg_inf, c), axis=1, keepdims=True)
            group_scores.append(top1)
        keep = jnp.zeros((bt, e), jnp.bool_)
        for h, s_h in enumerate(group_scores):  # rank of group h; ties favour the lower group index
            rank = sum(
                ((s > s_h) | ((s == s_h) & (j < h))).astype(jnp.int32) for j, s in enumerate(group_scores)
            )  # [bt, 1]
            keep = keep | ((group_of == h) & (rank < cfg.topk_group))
        choice = jnp.where(keep, choice, neg_inf)

    slot = lax.broadcasted_iota(jnp.int32, (bt, cfg.top_k), 1)
    ids = jnp.zeros((bt, cfg.top_k), jnp.int32)
    gates = jnp.zeros((bt, cfg.top_k), jnp.float32)
    taken = jnp.zeros((bt, e), jnp.bool_)
    for j in range(cfg.top_k):
        c = jnp.where(taken, neg_inf, choice)
        mx = jnp.max(c, axis=1, keepdims=True)  # [bt, 1]
        idx = jnp.min(jnp.where((c == mx) & ~taken, lane, e), axis=1, keepdims=True)  # [bt, 1]
        hit = lane == idx  # [bt, e]
        taken = taken | hit
        ids = jnp.where(slot == j, idx, ids)
        gates = jnp.where(slot == j, jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True), gates)
    if cfg.norm_topk_prob:
        gates = gates / (jnp.sum(gates, axis=1, keepdims=True) + 1e-20)
    ids_ref[...] = ids
    gates_ref[...] = gates * cfg.routed_scaling_factor
    counts_ref[...] = jnp.sum((taken & (valid_ref[...] != 0)).astype(jnp.int32), axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes", "interpret"))
def route(logits, bias, valid, *, cfg: RouterConfig, block_sizes: BlockSizes = BlockSizes(), interpret=False):
    """logits [t, e], bias [e], valid [t] bool -> ids [t, k] int32, gates [t, k] f32, counts [e] int32
    (counts only the valid tokens)."""
    t, e = logits.shape
    bt = min(block_sizes.bt, -(-t // 8) * 8)
    tp = -(-t // bt) * bt
    nb = tp // bt
    logits = jnp.pad(logits, ((0, tp - t), (0, 0)))
    valid = jnp.pad(valid.astype(jnp.int32), (0, tp - t))[:, None]  # [tp, 1]; block padding is invalid
    ids, gates, counts = pl.pallas_call(
        functools.partial(_router_kernel, cfg=cfg),
        grid=(nb,),
        in_specs=[
            pl.BlockSpec((bt, e), lambda i: (i, 0)),
            pl.BlockSpec((1, e), lambda i: (0, 0)),
            pl.BlockSpec((bt, 1), lambda i: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((bt, cfg.top_k), lambda i: (i, 0)),
            pl.BlockSpec((bt, cfg.top_k), lambda i: (i, 0)),
            pl.BlockSpec((None, 1, e), lambda i: (i, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((tp, cfg.top_k), jnp.int32),
            jax.ShapeDtypeStruct((tp, cfg.top_k), jnp.float32),
            jax.ShapeDtypeStruct((nb, 1, e), jnp.int32),
        ],  # per-block partial counts
        interpret=interpret,
    )(logits, bias.reshape(1, e), valid)
    return ids[:t], gates[:t], jnp.sum(counts, axis=(0, 1))
