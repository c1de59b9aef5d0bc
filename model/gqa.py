"""Grouped-query attention (Ainslie et al. 2023, "GQA", Sec. 2; Llama 3 report Sec. 3.1.1; Qwen2
report Sec. 2.1), the attention of Llama 3.1 and Qwen2.5 / Qwen3.

h query heads share j = ``n_kv_heads`` key/value heads in groups of p = h / j (j = h: multi-head
attention; j = 1: multi-query attention, Shazeer 2019):

  q = x W_Q (+ b_Q)                        [b, t, h, k]
  k = x W_K (+ b_K),  v = x W_V (+ b_V)    [b, s, j, k]     (biases: Qwen2's qkv bias)
  q, k <- RMSNorm_k(q), RMSNorm_k(k)       per head, over k (Qwen3's q_norm / k_norm), before RoPE
  q, k <- RoPE(q), RoPE(k)                 over the whole head, rotate-half layout (x[i], x[i + k/2])
  o_i  = softmax(q_i k_{i // p}^T / sqrt(k) + mask) v_{i // p}       query head i, KV head i // p
  out  = o W_O                             [b, t, d]

Query head i reads KV head i // p: ``jnp.repeat`` of the KV heads, transformers' ``repeat_kv``.
The softmax runs in ``model/attention.py`` (``cfg.attention_impl``), whose backends take one head
axis for q, k and v, so the KV heads are repeated to h before the call. Cost: the repeated k and v
are b s h k numbers each, as in multi-head attention, where the projections made b s j k (p times
fewer); they live inside the attention's activation memory (the backward of the repeat sums the p
copies' gradients). The KV cache (``model/decode.py``) keeps the j heads only and attends with a
grouped einsum, never repeating.

Parameter names: wq [d, h, k], wk / wv [d, j, k], wo [h, k, d], bq [h, k], bk / bv [j, k],
q_norm / k_norm [k] (transformers: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import attention
from model.config import ModelConfig
from model.linear import linear
from model.norms import RMSNorm
from model.params import linear_param, param
from model.rope import apply_rope, rope_angles


class GQA(nnx.Module):
    """Grouped-query attention; see the module docstring for the math."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, j, k, pd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.param_dtype
        self.wq = linear_param((d, h, k), d, pd, ("embed", "heads", "head_dim"), rngs=rngs)
        self.wk = linear_param((d, j, k), d, pd, ("embed", "kv_heads", "head_dim"), rngs=rngs)
        self.wv = linear_param((d, j, k), d, pd, ("embed", "kv_heads", "head_dim"), rngs=rngs)
        self.wo = linear_param((h, k, d), h * k, pd, ("heads", "head_dim", "embed"), rngs=rngs)
        if cfg.qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.bq = param(zeros, (h, k), pd, ("heads", "head_dim"), rngs=None)
            self.bk = param(zeros, (j, k), pd, ("kv_heads", "head_dim"), rngs=None)
            self.bv = param(zeros, (j, k), pd, ("kv_heads", "head_dim"), rngs=None)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(k, eps=cfg.rms_eps, param_dtype=pd)
            self.k_norm = RMSNorm(k, eps=cfg.rms_eps, param_dtype=pd)

    def rope(self, positions: jax.Array):
        """cos, sin [b, t, k/2] for ``positions`` [b, t] (YaRN or Llama-3.1 scaling from the config)."""
        cfg = self.cfg
        return rope_angles(positions, cfg.attn_head_dim, cfg.rope_theta, cfg.yarn, cfg.llama3_rope)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [b, t, d] -> rotated q [b, t, h, k], rotated k [b, t, j, k], v [b, t, j, k]: what
        attention reads (and the cache stores: k and v). Shared with ``model/decode.py``."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x.astype(dt)
        q = linear("btd,dhk->bthk", x, self.wq[...], dtype=dt)  # [b, t, h, k]
        k = linear("btd,djk->btjk", x, self.wk[...], dtype=dt)  # [b, t, j, k]
        v = linear("btd,djk->btjk", x, self.wv[...], dtype=dt)  # [b, t, j, k]
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin, interleave=False), apply_rope(k, cos, sin, interleave=False), v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, ep=None) -> jax.Array:
        """x [b, t, d] -> [b, t, d]; ``ep``: the model's ``shard_map`` layout (``model/attention.py``)."""
        cfg = self.cfg
        cos, sin = self.rope(positions)
        q, k, v = self.qkv(x, cos, sin)  # [b, t, h, k], [b, s, j, k], [b, s, j, k]
        p = cfg.n_heads // cfg.kv_heads
        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [b, t, h, k] -> [b, h, t, k]
        k = heads_first(jnp.repeat(k, p, axis=2))  # [b, h, s, k]: query head i reads KV head i // p
        v = heads_first(jnp.repeat(v, p, axis=2))  # [b, h, s, k]
        o = attention(heads_first(q), k, v, segment_ids, scale=cfg.softmax_scale, impl=cfg.attention_impl, ep=ep)
        return linear("bhtk,hkd->btd", o, self.wo[...], dtype=jnp.dtype(cfg.dtype))  # o [b, h, t, k]
