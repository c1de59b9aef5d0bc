"""MTP speculative decoding (DeepSeek-V3 report Sec. 5.4.3): the MTP module drafts the next token,
the main model verifies it in the same forward that computes the step after it.

Positions: the main model at position i reads token s_i and predicts s_{i+1}; MTP module 1 at
position i reads the main model's final-normed hidden h_i and Emb(s_{i+1}) and predicts s_{i+2}
(``model/mtp.py``). A row's state is its newest token s_p (not yet cached) and a draft d for
s_{p+1}. One step:

  1. main model on [s_p, d] at positions [p, p+1] (cached)  -> target logits for s_{p+1}, s_{p+2}
  2. accept d with probability min(1, P(d) / Q(d)) (Leviathan et al. 2023, Alg. 1; Chen et al.
     2023): P the target distribution for s_{p+1}, Q the distribution d was drawn from. Accepted:
     s_{p+1} = d and s_{p+2} ~ P(. | ..., d) is free (it came out of the same forward). Rejected:
     s_{p+1} ~ norm(max(0, P - Q)), and the draft's cache slot is overwritten next step.
     Every emitted token is then distributed exactly as plain sampling's; when greedy, P and Q
     are one-hot, so "accept" is "d is the argmax" and the output is plain greedy's, token for token.
  3. MTP on [(h_p, s_{p+1}), (h_{p+1}, s_{p+2})] at positions [p, p+1] (its own one-layer cache,
     kept exact the same way) -> the next draft, from position p+1 if accepted, else p.

So each step emits 1 or 2 tokens per row for one main forward of 2 tokens plus one MTP layer.
Sampling settings (temperature, top-k, top-p) shape P and Q alike (``model/sampling.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model import decode
from model import sampling as sampling_lib
from model.mtp import shift_left
from model.sampling import Sampling


class SpecState(NamedTuple):
    cache: tuple  # main model's layers
    mtp_cache: dict  # MTP module 1's layer
    tok: jax.Array  # [b] newest token s_p, not yet in the cache
    pos: jax.Array  # [b] p
    draft: jax.Array  # [b] draft for s_{p+1}
    q: jax.Array  # [b, V] f32 the distribution the draft was drawn from


def _draft(model, h_mtp: jax.Array, sampling: Sampling, key):
    """MTP head on h_mtp [b, d] -> (draft [b], its distribution [b, V])."""
    logits = model.logits_from(h_mtp[:, None])[:, 0]  # [b, V]
    return sampling_lib.sample(logits, key, sampling), sampling_lib.probs(logits, sampling)


def start(model, tokens, lengths, sampling: Sampling, key, total: int, kind: str):
    """Prefill main model and MTP -> (SpecState, first tokens [b], their log-probs [b])."""
    b, t = tokens.shape
    k_first, k_draft = jax.random.split(key)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < lengths[:, None]
    caches = decode.init_cache(model.cfg, b, total, kind)
    mtp_cache = decode.init_layer_cache(model.cfg, b, total, kind)
    h, caches = decode.hidden_cached(model, tokens, positions, valid, caches)  # [b, T, d]
    last_at = (lengths - 1)[:, None, None]
    last = model.logits_from(jnp.take_along_axis(h, last_at, axis=1))[:, 0]  # [b, V]
    first = sampling_lib.sample(last, k_first, sampling)
    ahead = jnp.where(positions == lengths[:, None] - 1, first[:, None], shift_left(tokens, 1))  # s_{i+1}
    h_mtp, mtp_cache = decode.mtp_cached(model, h, ahead, positions, valid, mtp_cache)
    draft, q = _draft(model, jnp.take_along_axis(h_mtp, last_at, axis=1)[:, 0], sampling, k_draft)
    st = SpecState(caches, mtp_cache, first, lengths, draft, q)
    return st, first, sampling_lib.logprob(last, first, sampling)


def accept_or_resample(p: jax.Array, q: jax.Array, draft: jax.Array, greedy: jax.Array, key):
    """Speculative acceptance for one draft: p, q [b, V], draft [b] ~ q, greedy [b] bool (p, q
    one-hot) -> (token [b], accepted [b])."""
    k_u, k_res = jax.random.split(key)
    p_d = jnp.take_along_axis(p, draft[:, None], -1)[:, 0]
    q_d = jnp.take_along_axis(q, draft[:, None], -1)[:, 0]
    accepted = jax.random.uniform(k_u, draft.shape) * q_d < p_d  # u < p(d) / q(d); q(d) > 0
    residual = jnp.maximum(p - q, 0.0)  # [b, V]; all zero only if p == q, when every draft is accepted
    # greedy rows: the residual of two one-hots is p's one-hot, i.e. its argmax
    resampled = sampling_lib.categorical_or_argmax(
        k_res, jnp.log(residual), ~greedy & ~accepted, sampling_lib.argmax(p)
    )
    return jnp.where(accepted, draft, resampled), accepted


def step(model, st: SpecState, done, sampling: Sampling, key, weights=None):
    """Verify the draft, draft again -> (state, new [b, 2], log-probs [b, 2], available [b] (1 or 2),
    drafted [b], accepted [b]). ``weights``: ``decode.decode_weights(model, mtp=True)`` or None."""
    b = st.tok.shape[0]
    k_acc, k_bonus, k_draft = jax.random.split(key, 3)
    positions = st.pos[:, None] + jnp.arange(2, dtype=jnp.int32)  # [b, 2]
    valid = jnp.ones((b, 2), bool)
    weights = (None,) * (model.cfg.n_layers + 1) if weights is None else weights
    h, caches = decode.hidden_cached(
        model, jnp.stack([st.tok, st.draft], 1), positions, valid, st.cache, small_batch=True, weights=weights
    )  # [b, 2, d]
    logits = model.logits_from(h)  # [b, 2, V]
    x1, accepted = accept_or_resample(
        sampling_lib.probs(logits[:, 0], sampling), st.q, st.draft, sampling.temperature <= 0, k_acc
    )
    x2 = sampling_lib.sample(logits[:, 1], k_bonus, sampling)  # s_{p+2}: used only if accepted
    new = jnp.stack([x1, x2], 1)  # [b, 2]
    lps = jnp.stack(
        [sampling_lib.logprob(logits[:, 0], x1, sampling), sampling_lib.logprob(logits[:, 1], x2, sampling)], 1
    )
    h_mtp, mtp_cache = decode.mtp_cached(
        model, h, new, positions, valid, st.mtp_cache, small_batch=True, lw=weights[-1]
    )
    draft, q = _draft(model, jnp.where(accepted[:, None], h_mtp[:, 1], h_mtp[:, 0]), sampling, k_draft)
    tok = jnp.where(accepted, x2, x1)
    pos = jnp.where(done, st.pos, st.pos + 1 + accepted)
    acc = accepted.astype(jnp.int32)
    return SpecState(caches, mtp_cache, tok, pos, draft, q), new, lps, 1 + acc, jnp.ones_like(acc), acc
