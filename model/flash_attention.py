"""Blockwise causal attention in plain XLA (FlashAttention-2; Dao 2023, Alg. 1 and 2).

For one (batch, head), queries in blocks Q_i of B rows visit the key/value blocks K_j, V_j with
j <= i (causal block skipping: blocks above the diagonal are never computed) and keep a running
max m, normaliser l and unnormalised output acc (the online softmax, Milakov & Gimelshein 2018):

    S = Q_i K_j^T * scale,  masked where causal or segment ids forbid  (f32, [B, B])
    m' = max(m, rowmax S),  P = exp(S - m'),  l' = e^{m - m'} l + rowsum P
    acc' = e^{m - m'} acc + P V_j;  at the end O_i = acc / l, L_i = m + log l (the logsumexp)

The backward (``custom_vjp``) saves only O and L besides the inputs and recomputes P = exp(S - L)
block by block: with D = rowsum(dO * O),

    dV_j += P^T dO_i,  dS = P * (dO_i V_j^T - D_i),  dK_j += dS^T Q_i * scale,  dQ_i += dS K_j * scale

so memory is linear in the sequence length: the [B, B] tile of one step, never [t, t].

Masked scores get a large finite negative value rather than -inf, as the reference does: a row
whose keys in the current block are all masked accumulates garbage that the e^{m - m'} factor
zeroes once a visible key arrives, and every row sees at least itself (causal; padding, segment
0, attends to padding), so no softmax row is empty. Sequences are padded to a multiple of B with
segment id -1 (its own segment), and the padding is cut off again.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_MASKED = -1e30  # same convention as the naive reference (model/attention.py)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tile_mask(seg_q, seg_k, i, j, block):
    """Allowed [b, 1, B, B] for query block i against key block j (causal and same segment)."""
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    causal = rows[:, None] >= cols[None, :]  # [B, B]
    same = seg_q[:, :, None] == seg_k[:, None, :]  # [b, B, B]
    return (same & causal[None])[:, None]


def _block(x, idx, block, axis):
    return lax.dynamic_slice_in_dim(x, idx * block, block, axis=axis)


def _forward(q, k, v, seg, scale, block):
    """q [b, h, T, k], k [b, h, T, k], v [b, h, T, v], seg [b, T] -> (o [b, h, T, v], lse [b, h, T])."""
    b, h, t, _ = q.shape
    dv = v.shape[-1]
    n_blocks = t // block

    def q_block(i, carry):
        o, lse = carry
        qi = _block(q, i, block, 2)  # [b, h, B, k]
        seg_q = _block(seg, i, block, 1)  # [b, B]

        def k_block(j, state):
            m, l, acc = state
            kj, vj, seg_k = _block(k, j, block, 2), _block(v, j, block, 2), _block(seg, j, block, 1)
            s = jnp.einsum("bhqk,bhsk->bhqs", qi, kj, preferred_element_type=jnp.float32) * scale  # [b, h, B, B]
            s = jnp.where(_tile_mask(seg_q, seg_k, i, j, block), s, _MASKED)
            m_new = jnp.maximum(m, s.max(-1))  # [b, h, B]
            p = jnp.exp(s - m_new[..., None])  # [b, h, B, B]
            alpha = jnp.exp(m - m_new)  # [b, h, B]
            pv = jnp.einsum("bhqs,bhsv->bhqv", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (
            jnp.full((b, h, block), _MASKED, jnp.float32),
            jnp.zeros((b, h, block), jnp.float32),
            jnp.zeros((b, h, block, dv), jnp.float32),
        )
        m, l, acc = lax.fori_loop(0, i + 1, k_block, init)  # causal: key blocks j <= i only
        o = lax.dynamic_update_slice_in_dim(o, (acc / l[..., None]).astype(o.dtype), i * block, axis=2)
        lse = lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * block, axis=2)
        return o, lse

    init = (jnp.zeros((b, h, t, dv), q.dtype), jnp.zeros((b, h, t), jnp.float32))
    return lax.fori_loop(0, n_blocks, q_block, init)


def _backward(q, k, v, seg, o, lse, do, scale, block):
    """Gradients (dq, dk, dv) by recomputing each [B, B] tile from q, k and the saved lse."""
    t = q.shape[2]
    n_blocks = t // block
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [b, h, T]

    def k_block(j, dq):
        kj, vj, seg_k = _block(k, j, block, 2), _block(v, j, block, 2), _block(seg, j, block, 1)

        def q_block(i, state):
            dq, dk_j, dv_j = state
            qi, doi = _block(q, i, block, 2), _block(do, i, block, 2)  # [b, h, B, k], [b, h, B, v]
            s = jnp.einsum("bhqk,bhsk->bhqs", qi, kj, preferred_element_type=jnp.float32) * scale
            allowed = _tile_mask(_block(seg, i, block, 1), seg_k, i, j, block)
            p = jnp.where(allowed, jnp.exp(s - _block(lse, i, block, 2)[..., None]), 0.0)  # [b, h, B, B]
            dv_j = dv_j + jnp.einsum("bhqs,bhqv->bhsv", p.astype(do.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhqv,bhsv->bhqs", doi, vj, preferred_element_type=jnp.float32)  # [b, h, B, B]
            ds = (p * (dp - _block(d, i, block, 2)[..., None]) * scale).astype(q.dtype)
            dk_j = dk_j + jnp.einsum("bhqs,bhqk->bhsk", ds, qi, preferred_element_type=jnp.float32)
            dq_i = _block(dq, i, block, 2) + jnp.einsum("bhqs,bhsk->bhqk", ds, kj, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, axis=2), dk_j, dv_j

        init = (dq, jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        dq, dk_j, dv_j = lax.fori_loop(j, n_blocks, q_block, init)  # causal: query blocks i >= j only
        return dq, dk_j, dv_j

    def body(j, carry):
        dq, dk, dv = carry
        dq, dk_j, dv_j = k_block(j, dq)
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j.astype(dk.dtype), j * block, axis=2)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * block, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    dq, dk, dv = lax.fori_loop(0, n_blocks, body, init)
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, scale, block):
    return _forward(q, k, v, seg, scale, block)[0]


def _flash_fwd(q, k, v, seg, scale, block):
    o, lse = _forward(q, k, v, seg, scale, block)
    return o, (q, k, v, seg, o, lse)  # no [t, t] residual: the backward recomputes the scores


def _flash_bwd(scale, block, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, scale, block)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float, block: int = 512
) -> jax.Array:
    """Causal, segment-masked attention: q [b, h, t, k], k [b, h, t, k], v [b, h, t, v],
    segment_ids [b, t] -> o [b, h, t, v]. Blocks of ``block`` rows (capped at t rounded up to 8)."""
    t = q.shape[2]
    block = min(block, _round_up(t, 8))
    pad = _round_up(t, block) - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    return _flash(q, k, v, segment_ids.astype(jnp.int32), float(scale), block)[:, :, :t]
