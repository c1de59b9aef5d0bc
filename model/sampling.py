"""Token sampling: temperature, top-k, top-p (nucleus), per row, inside jit.

``Sampling`` holds one setting per batch row (``[b]`` arrays), so one compiled step serves every
mix of requests. Order as in transformers: temperature, then top-k, then top-p over what top-k
kept; thresholds are on values, so tokens tied with the last kept one are kept too. Temperature 0
is greedy (argmax of the raw logits).

``probs`` is the distribution a row actually samples from (one-hot at the argmax when greedy):
speculative decoding (``model/speculative.py``) needs it for the target and the draft.
``logprob`` is what reinforcement learning needs: log softmax(logits / T) of the chosen token,
restricted to the tokens top-k/top-p kept (T = 1 when greedy), i.e. the behaviour policy's
log-probability when sampling, the model's own when greedy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sampling(NamedTuple):
    temperature: jax.Array  # [b] f32, 0 = greedy
    top_k: jax.Array  # [b] int32, 0 = off
    top_p: jax.Array  # [b] f32, 1 = off


def make(batch: int, temperature=0.0, top_k=0, top_p=1.0) -> Sampling:
    """Per-row settings [b] from host scalars or sequences (checked here: one-line errors)."""
    t, k, p = (
        np.broadcast_to(np.asarray(x, dt), (batch,))
        for x, dt in ((temperature, np.float32), (top_k, np.int32), (top_p, np.float32))
    )
    for name, v, ok in (("temperature", t, t >= 0), ("top_k", k, k >= 0), ("top_p", p, (p > 0) & (p <= 1))):
        if not ok.all():
            raise ValueError(f"{name} out of range: {v.tolist()} (temperature >= 0, top_k >= 0, 0 < top_p <= 1)")
    return Sampling(jnp.asarray(t), jnp.asarray(k), jnp.asarray(p))


def _top_k_top_p(scaled: jax.Array, s: Sampling) -> jax.Array:
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [b, V]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)[:, None]  # [b, 1]
    in_k = jnp.arange(v)[None] < k  # [b, V] ranks top-k keeps
    p = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)  # [b, V] sorted
    before = jnp.cumsum(p, -1) - p  # mass of strictly more likely tokens
    n_keep = jnp.sum(in_k & (before < s.top_p[:, None]), -1)  # >= 1: smallest prefix with mass >= top_p
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], -1)  # [b, 1]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def warp(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [b, V] -> filtered log-weights [b, V] f32: logits / T, -inf outside top-k / top-p.

    The sort over the vocabulary runs only when some row filters (a ``lax.cond``: skipped at run
    time, not just at trace time)."""
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]  # greedy rows: T = 1
    scaled = logits.astype(jnp.float32) / temp
    filtering = jnp.any((s.top_k > 0) | (s.top_p < 1))
    return jax.lax.cond(filtering, _top_k_top_p, lambda x, _: x, scaled, s)


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` ([..., V] -> [...] int32: the first maximum, or the first NaN if any) as a
    max and a min over the last axis: XLA:CPU runs the variadic (value, index) reduce of argmax ~3x
    slower (0.33 against 0.11 ms at [8, 8192]; every decode step takes one)."""
    hit = (x == jnp.max(x, -1, keepdims=True)) | jnp.isnan(x)  # [..., V]
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), -1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits [b, V] -> token ids [b] int32. An all-greedy batch draws no random numbers."""
    return categorical_or_argmax(key, warp(logits, s), s.temperature > 0, argmax(logits))


def categorical_or_argmax(key, log_weights: jax.Array, sampled: jax.Array, greedy: jax.Array) -> jax.Array:
    """Row i: a draw from softmax(log_weights[i]) where sampled[i], else greedy[i]. [b, V] -> [b] int32."""

    def draw(_):
        return jnp.where(sampled, jax.random.categorical(key, log_weights, -1), greedy)

    return jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, None).astype(jnp.int32)


def probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """The distribution ``sample`` draws from: [b, V] f32 (one-hot at the argmax for greedy rows)."""
    onehot = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(s.temperature[:, None] > 0, jax.nn.softmax(warp(logits, s), -1), onehot)


def logprob(logits: jax.Array, tokens: jax.Array, s: Sampling) -> jax.Array:
    """log-probability [b] f32 of ``tokens`` [b] under the warped distribution (see module doc)."""
    lp = jax.nn.log_softmax(warp(logits, s), -1)  # [b, V]
    return jnp.take_along_axis(lp, tokens[:, None], -1)[:, 0]
