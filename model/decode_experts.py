"""Routed experts for a decode step: a few tokens, so read each needed weight once and skip dispatch.

The MoE layer's grouped matmul (``model/moe.py``) sorts assignments and multiplies row tiles of
``moe_block_rows`` rows: right for prefill and training, wasteful when a step has 1-64 tokens (a
1-token step still multiplies full tiles, once per visited expert). Same math, DeepSeek-V3 report
Sec. 2.1.2 eq. 12, layouts chosen statically by the step's size m (tokens) and k (top-k):

* m k < E ("gather"): each token multiplies the k expert matrices it chose, gathered by id;
  weights read: m k of the E experts (batch 1: k of E).
* otherwise ("dense"): every expert multiplies every token and a [m, e] gate matrix, zero off the
  chosen experts, mixes them; weights read: all E once, FLOPs E/k x the routed ones, cheap while
  m is small (and exactly what a bandwidth-bound step can afford).
* "gather" with the experts split once (``split_experts``, made by ``generation.prepare_for``):
  one ``lax.switch`` over the experts per (token, slot), each branch's dots reading that expert's
  own arrays in place (``routed_switch``): XLA:CPU copies any gathered or sliced matrix before a
  dot, so the plain gather copies k matrices per token and step.

The first two are batched products over the weights' leading axes ([m, k] or [e]) with the tokens
broadcast to match, so XLA:CPU reads every matrix in its stored layout. The broadcast goes through an
``optimization_barrier``: without it XLA folds it back into an unbatched dot and transposes the
gathered (or all) expert matrices in every step, 2x (batch 1) and 3x (batch 8) slower
(docs/benchmarks.md, "Generation").

``small_batch_moe`` is the dispatch: these up to ``max_tokens`` tokens, the layer itself beyond
(and under a quantized ``gemm_recipe``: its grouped FP8 / int8 matmul, ``model/grouped_matmul.py``).
Reference: the layer's ``__call__`` (tests/model/test_generation.py compares them, with gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.moe import MoE


def _materialised(x: jax.Array) -> jax.Array:
    """x as a real array, not a broadcast XLA may fold into the dot (see the module doc)."""
    return jax.lax.optimization_barrier(x)


def routed_gather(xt, ids, gates, w_gate, w_up, w_down, dt) -> jax.Array:
    """xt [m, d], ids/gates [m, k], weights [e, d, f] / [e, f, d] -> [m, d] f32."""
    xk = _materialised(jnp.broadcast_to(xt[:, None], ids.shape + xt.shape[1:]))  # [m, k, d]
    wg, wu, wd = (w[ids].astype(dt) for w in (w_gate, w_up, w_down))  # [m, k, d, f] x2, [m, k, f, d]
    g = jnp.einsum("mkd,mkdf->mkf", xk, wg)  # [m, k, f]
    u = jnp.einsum("mkd,mkdf->mkf", xk, wu)  # [m, k, f]
    y = jnp.einsum("mkf,mkfd->mkd", jax.nn.silu(g) * u, wd, preferred_element_type=jnp.float32)  # [m, k, d]
    return jnp.einsum("mkd,mk->md", y, gates)


class SplitExperts(NamedTuple):
    """One MoE layer's routed experts as separate arrays (``split_experts``), for ``routed_switch``."""

    gate_up: tuple  # E arrays [d, 2f]: W_gate[e] | W_up[e]
    down: tuple  # E arrays [f, d]: W_down[e]


def split_experts(moe: MoE) -> SplitExperts:
    """The layer's stacked expert weights split per expert, gate and up side by side, in the compute dtype."""
    dt = jnp.dtype(moe.cfg.dtype)
    wg, wu, wd = (w[...].astype(dt) for w in (moe.w_gate, moe.w_up, moe.w_down))
    e = wg.shape[0]
    return SplitExperts(tuple(jnp.concatenate([wg[i], wu[i]], -1) for i in range(e)), tuple(wd[i] for i in range(e)))


def routed_switch(xt, ids, gates, experts: SplitExperts, dt) -> jax.Array:
    """Same contract as ``routed_gather``, the weights split by ``split_experts``: each (token, slot)
    runs one branch of a ``lax.switch`` over the experts, whose two dots read expert e's arrays in
    place (no gathered copy of the chosen matrices)."""
    m, k = ids.shape
    f = experts.down[0].shape[0]

    def branch(e):
        def run(x, ws: SplitExperts):
            gu = jnp.einsum("d,df->f", x, ws.gate_up[e])  # [2f]
            return jnp.einsum("f,fd->d", jax.nn.silu(gu[:f]) * gu[f:], ws.down[e], preferred_element_type=jnp.float32)

        return run

    branches = [branch(e) for e in range(len(experts.down))]
    y = jnp.stack(
        [jnp.stack([jax.lax.switch(ids[i, j], branches, xt[i], experts) for j in range(k)]) for i in range(m)]
    )  # [m, k, d]
    return jnp.einsum("mkd,mk->md", y, gates)


def routed_dense(xt, ids, gates, w_gate, w_up, w_down, dt) -> jax.Array:
    """Same contract as ``routed_gather``; all experts on all tokens, masked by the gates."""
    m, e = xt.shape[0], w_gate.shape[0]
    combine = jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], ids].add(gates)  # [m, e]
    xe = _materialised(jnp.broadcast_to(xt[None], (e,) + xt.shape))  # [e, m, d]
    g = jnp.einsum("emd,edf->emf", xe, w_gate.astype(dt))  # [e, m, f]
    u = jnp.einsum("emd,edf->emf", xe, w_up.astype(dt))  # [e, m, f]
    y = jnp.einsum(
        "emf,efd->emd", jax.nn.silu(g) * u, w_down.astype(dt), preferred_element_type=jnp.float32
    )  # [e, m, d]
    return jnp.einsum("emd,me->md", y, combine)


def small_batch_moe(
    moe: MoE, x: jax.Array, valid: jax.Array, max_tokens: int = 64, experts: SplitExperts | None = None
) -> jax.Array:
    """x [b, t, d], valid [b, t] -> y [b, t, d]: the MoE layer's output (shared + routed).
    ``experts``: the layer's ``split_experts`` (gather steps then use ``routed_switch``), or None."""
    cfg = moe.cfg
    b, t, d = x.shape
    m, k, e = b * t, cfg.n_experts_per_tok, cfg.n_routed_experts
    if m > max_tokens or cfg.gemm_recipe != "bf16":  # quantized recipes: the layer's grouped FP8 matmul
        return moe(x, valid.astype(jnp.int32))[0]
    dt = jnp.dtype(cfg.dtype)
    xt = x.reshape(m, d).astype(dt)
    r = moe.router(xt, valid.reshape(m))  # ids, gates [m, k]
    if m * k < e and experts is not None:
        out = routed_switch(xt, r.ids, r.gates, experts, dt)  # [m, d] f32
    else:
        routed = routed_gather if m * k < e else routed_dense
        out = routed(xt, r.ids, r.gates, moe.w_gate[...], moe.w_up[...], moe.w_down[...], dt)  # [m, d] f32
    out = out + moe.shared_experts(xt)
    return out.reshape(b, t, d).astype(x.dtype)
