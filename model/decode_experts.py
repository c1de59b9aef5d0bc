"""Routed experts for a decode step: a few tokens, so read each needed weight once and skip dispatch.

The MoE layer's grouped matmul (``model/moe.py``) sorts assignments and multiplies row tiles of
``moe_block_rows`` rows: right for prefill and training, wasteful when a step has 1-64 tokens (a
1-token step still multiplies full tiles, once per visited expert). Same math, DeepSeek-V3 report
Sec. 2.1.2 eq. 12, two layouts chosen statically by the step's size m (tokens) and k (top-k):

* m k < E ("gather"): each token multiplies the k expert matrices it chose, gathered by id;
  weights read: m k of the E experts (batch 1: k of E).
* otherwise ("dense"): every expert multiplies every token and a [m, e] gate matrix, zero off the
  chosen experts, mixes them; weights read: all E once, FLOPs E/k x the routed ones, cheap while
  m is small (and exactly what a bandwidth-bound step can afford).

``small_batch_moe`` is the dispatch: these two up to ``max_tokens`` tokens, the layer itself beyond.
Reference: the layer's ``__call__`` (tests/model/test_decode.py compares them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.moe import MoE


def routed_gather(xt, ids, gates, w_gate, w_up, w_down, dt) -> jax.Array:
    """xt [m, d], ids/gates [m, k], weights [e, d, f] / [e, f, d] -> [m, d] f32."""
    wg, wu, wd = (w[ids].astype(dt) for w in (w_gate, w_up, w_down))  # [m, k, d, f] x2, [m, k, f, d]
    g = jnp.einsum("md,mkdf->mkf", xt, wg)  # [m, k, f]
    u = jnp.einsum("md,mkdf->mkf", xt, wu)  # [m, k, f]
    y = jnp.einsum("mkf,mkfd->mkd", jax.nn.silu(g) * u, wd, preferred_element_type=jnp.float32)  # [m, k, d]
    return jnp.einsum("mkd,mk->md", y, gates)


def routed_dense(xt, ids, gates, w_gate, w_up, w_down, dt) -> jax.Array:
    """Same contract as ``routed_gather``; all experts on all tokens, masked by the gates."""
    m, e = xt.shape[0], w_gate.shape[0]
    combine = jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], ids].add(gates)  # [m, e]
    g = jnp.einsum("md,edf->emf", xt, w_gate.astype(dt))  # [e, m, f]
    u = jnp.einsum("md,edf->emf", xt, w_up.astype(dt))  # [e, m, f]
    y = jnp.einsum(
        "emf,efd->emd", jax.nn.silu(g) * u, w_down.astype(dt), preferred_element_type=jnp.float32
    )  # [e, m, d]
    return jnp.einsum("emd,me->md", y, combine)


def small_batch_moe(moe: MoE, x: jax.Array, valid: jax.Array, max_tokens: int = 64) -> jax.Array:
    """x [b, t, d], valid [b, t] -> y [b, t, d]: the MoE layer's output (shared + routed)."""
    cfg = moe.cfg
    b, t, d = x.shape
    m, k, e = b * t, cfg.n_experts_per_tok, cfg.n_routed_experts
    if m > max_tokens:
        return moe(x, valid.astype(jnp.int32))[0]
    dt = jnp.dtype(cfg.dtype)
    xt = x.reshape(m, d).astype(dt)
    r = moe.router(xt, valid.reshape(m))  # ids, gates [m, k]
    routed = routed_gather if m * k < e else routed_dense
    out = routed(xt, r.ids, r.gates, moe.w_gate[...], moe.w_up[...], moe.w_down[...], dt)  # [m, d] f32
    if moe.shared is not None:
        out = out + moe.shared(xt).astype(jnp.float32)
    return out.reshape(b, t, d).astype(x.dtype)
