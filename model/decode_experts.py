"""Routed experts for a decode step: a few tokens, so read each needed weight once and skip dispatch.

The MoE layer's grouped matmul (``model/moe.py``) sorts assignments and multiplies row tiles of
``moe_block_rows`` rows: right for prefill and training, wasteful when a step has 1-64 tokens (a
1-token step still multiplies full tiles, once per visited expert). Here, same math (DeepSeek-V3
report Sec. 2.1.2 eq. 12), one expert at a time:

    y = sum_e [e chosen by some token] combine[:, e] * SwiGLU_e(x)      combine [m, e]: gates, 0 off the choice

Each routed expert is a ``lax.cond`` that runs only when a token of the step chose it, on all m
tokens of the step (rows that did not choose it get weight 0). Weights read per step: the touched
experts, once each (batch 1: k of E; batch 8: most of them); FLOPs: touched x m instead of m k,
cheap while m is small (and exactly what a bandwidth-bound step can afford).

Why one expert per branch and not a gather ``w[ids]`` or an einsum over all experts: on XLA:CPU a
gather copies the chosen matrices every step, and an "md,edf" contraction transposes every expert
matrix every step (measured in docs/benchmarks.md, "Generation"). The weights must therefore be
separate arrays before the loop: ``split_experts`` (``model/generation.py`` calls it once per
compiled loop, outside ``lax.while_loop``); without them ``small_batch_moe`` splits per call.

``small_batch_moe`` is the dispatch: this path up to ``max_tokens`` tokens, the layer itself beyond.
Reference: the layer's ``__call__`` (tests/model/test_generation.py compares them, with gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.moe import MoE


def split_experts(moe: MoE) -> tuple:
    """The routed experts as E separate (w_gate [d, f], w_up [d, f], w_down [f, d]) triples."""
    w = (moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    return tuple(tuple(a[e] for a in w) for e in range(w[0].shape[0]))


def routed_per_expert(xt, ids, gates, experts: tuple, dt) -> jax.Array:
    """xt [m, d], ids/gates [m, k], experts from ``split_experts`` -> [m, d] f32."""
    m, e = xt.shape[0], len(experts)
    combine = jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], ids].add(gates)  # [m, e]
    touched = jnp.zeros((e,), bool).at[ids].set(True)  # [e]
    out = jnp.zeros(xt.shape, jnp.float32)  # [m, d]
    for i, (w_gate, w_up, w_down) in enumerate(experts):

        def run(out, c, w_gate=w_gate, w_up=w_up, w_down=w_down):
            g = jnp.einsum("md,df->mf", xt, w_gate.astype(dt))  # [m, f]
            u = jnp.einsum("md,df->mf", xt, w_up.astype(dt))  # [m, f]
            y = jnp.einsum("mf,fd->md", jax.nn.silu(g) * u, w_down.astype(dt), preferred_element_type=jnp.float32)
            return out + c[:, None] * y

        out = jax.lax.cond(touched[i], run, lambda out, c: out, out, combine[:, i])
    return out


def small_batch_moe(moe: MoE, x: jax.Array, valid: jax.Array, experts=None, max_tokens: int = 64) -> jax.Array:
    """x [b, t, d], valid [b, t] -> y [b, t, d]: the MoE layer's output (shared + routed).
    ``experts``: ``split_experts(moe)`` made once outside the decoding loop (None: split here)."""
    cfg = moe.cfg
    b, t, d = x.shape
    m = b * t
    if m > max_tokens:
        return moe(x, valid.astype(jnp.int32))[0]
    dt = jnp.dtype(cfg.dtype)
    xt = x.reshape(m, d).astype(dt)
    r = moe.router(xt, valid.reshape(m))  # ids, gates [m, k]
    out = routed_per_expert(xt, r.ids, r.gates, split_experts(moe) if experts is None else experts, dt)  # [m, d]
    if moe.shared is not None:
        out = out + moe.shared(xt).astype(jnp.float32)
    return out.reshape(b, t, d).astype(x.dtype)
