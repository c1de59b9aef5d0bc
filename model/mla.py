"""Multi-head Latent Attention (DeepSeek-V2 report Sec. 2.1; DeepSeek-V3 report Sec. 2.1.1, eq. 1-11).

Queries and keys/values go through low-rank latents:

  c_Q  = RMSNorm(x W_DQ)                  [b, t, q]   (skipped when q_lora_rank is None: q = x W_Q)
  q    = c_Q W_UQ -> [q_nope | q_rope]     [b, t, h, n + r]
  [c_KV | k_rope] = x W_DKV                [b, s, c + r]   c_KV then RMSNorm'd
  [k_nope | v] = c_KV W_UKV                [b, s, h, n + v]
  k_rope is shared by all heads (the "decoupled" RoPE key), rotated once per position.
  o = softmax((q_nope.k_nope + q_rope.k_rope) * scale + mask) v,  out = o W_O

Only c_KV and the rotated k_rope need caching at decode time: (c + r) numbers per token per layer
(512 + 64 = 576 in DeepSeek-V3). ``model/decode.py`` uses that cache in the absorbed form.

The mask is causal and block-diagonal over ``segment_ids`` so packed documents never attend to
each other; padding (segment 0) only attends to padding, which keeps every softmax row finite.
The softmax itself runs in ``model/attention.py`` (backend ``cfg.attention_impl``: the naive
[t, t] reference, blockwise XLA, TPU splash or cuDNN).
Parameter names follow DeepSeek's reference code (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import attention
from model.config import ModelConfig
from model.linear import linear
from model.norms import RMSNorm
from model.params import linear_param
from model.rope import apply_rope, rope_angles


class MLA(nnx.Module):
    """Multi-head Latent Attention; see the module docstring for the math."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, c, r, n, v = (
            cfg.d_model,
            cfg.n_heads,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
        )
        pd = cfg.param_dtype
        if cfg.q_lora_rank is None:
            self.wq = linear_param((d, h, n + r), d, pd, ("embed", "heads", "head_dim"), rngs=rngs)
        else:
            q = cfg.q_lora_rank
            self.wq_a = linear_param((d, q), d, pd, ("embed", "q_lora"), rngs=rngs)
            self.q_norm = RMSNorm(q, eps=cfg.rms_eps, param_dtype=pd)
            self.wq_b = linear_param((q, h, n + r), q, pd, ("q_lora", "heads", "head_dim"), rngs=rngs)
        self.wkv_a = linear_param((d, c + r), d, pd, ("embed", "kv_lora"), rngs=rngs)
        self.kv_norm = RMSNorm(c, eps=cfg.rms_eps, param_dtype=pd)
        self.wkv_b = linear_param((c, h, n + v), c, pd, ("kv_lora", "heads", "head_dim"), rngs=rngs)
        self.wo = linear_param((h, v, d), h * v, pd, ("heads", "head_dim", "embed"), rngs=rngs)

    # ---- pieces shared with absorbed decoding (model/decode.py) ----
    def queries(self, x: jax.Array, cos, sin):
        """q_nope [b, t, h, n], rotated q_rope [b, t, h, r]."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x.astype(dt)
        if cfg.q_lora_rank is None:
            qf = linear("btd,dhk->bthk", x, self.wq[...], dtype=dt, recipe=cfg.gemm_recipe)  # [b, t, h, n+r]
        else:
            cq = self.q_norm(linear("btd,dq->btq", x, self.wq_a[...], dtype=dt, recipe=cfg.gemm_recipe))  # [b, t, q]
            qf = linear("btq,qhk->bthk", cq, self.wq_b[...], dtype=dt, recipe=cfg.gemm_recipe)  # [b, t, h, n+r]
        q_nope, q_rope = qf[..., : cfg.qk_nope_head_dim], qf[..., cfg.qk_nope_head_dim :]
        return q_nope, apply_rope(q_rope, cos, sin, interleave=cfg.rope_interleave)

    def latents(self, x: jax.Array, cos, sin):
        """Normalised c_KV [b, s, c] and rotated shared k_rope [b, s, r]: what the cache stores."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        ckv = linear("bsd,dc->bsc", x, self.wkv_a[...], dtype=dt, recipe=cfg.gemm_recipe)  # [b, s, c+r]
        c_kv = self.kv_norm(ckv[..., : cfg.kv_lora_rank])  # [b, s, c]
        k_rope = apply_rope(ckv[..., cfg.kv_lora_rank :], cos, sin, interleave=cfg.rope_interleave)  # [b, s, r]
        return c_kv, k_rope

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, ep=None) -> jax.Array:
        """x [b, t, d] -> [b, t, d]; ``ep``: the model's ``shard_map`` layout (``model/attention.py``)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        n = cfg.qk_nope_head_dim
        cos, sin = rope_angles(positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn)
        q_nope, q_rope = self.queries(x, cos, sin)  # [b, t, h, n], [b, t, h, r]
        c_kv, k_rope = self.latents(x, cos, sin)  # [b, s, c], [b, s, r]
        kv = linear("bsc,chk->bshk", c_kv, self.wkv_b[...], dtype=dt, recipe=cfg.gemm_recipe)  # [b, s, h, n+v]
        k_nope, v = kv[..., :n], kv[..., n:]
        h, r = cfg.n_heads, cfg.qk_rope_head_dim
        # One score einsum over [nope | rope] with (b, h) leading: XLA:CPU runs small-K dots with
        # trailing batch dims ~5x slower than this layout (measured on moe_tiny shapes).
        q = jnp.concatenate([q_nope, q_rope], -1).transpose(0, 2, 1, 3)  # [b, h, t, n+r]
        k_rope_h = jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, r))
        k = jnp.concatenate([k_nope, k_rope_h], -1).transpose(0, 2, 1, 3)  # [b, h, s, n+r]
        v = v.transpose(0, 2, 1, 3)  # [b, h, s, v]
        o = attention(q, k, v, segment_ids, scale=cfg.softmax_scale, impl=cfg.attention_impl, ep=ep)  # [b, h, t, v]
        return linear("bhtv,hvd->btd", o, self.wo[...], dtype=dt, recipe=cfg.gemm_recipe)
