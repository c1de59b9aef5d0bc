"""Multi-Token Prediction (DeepSeek-V3 report Sec. 2.2, eq. 21-25).

Module k (k = 1..D) predicts token t_{i+k+1} at position i from the previous depth's hidden
state h^{k-1}_i and the embedding of token t_{i+k}:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      M_k: [2d, d]  (eq. 21)
    h^k    = TRM_k(h'^k)                                            (eq. 22)
    P^k    = OutHead(RMSNorm_k(h^k))                                (eq. 23)

The embedding and output head are shared with the main model. The concatenation order is
*embedding first*: the paper's eq. 21 writes h first, but DeepSeek's released weights (layer 61:
``enorm``, ``hnorm``, ``eh_proj``) are consumed as [enorm(emb); hnorm(h)], and we follow the
weights. h^0 is the main model's final-normed hidden state (as inference engines feed it);
h^k for k >= 1 is module k's block output. Each module's TRM is one MoE block.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.block import Block
from model.config import ModelConfig
from model.linear import linear
from model.norms import RMSNorm
from model.params import linear_param


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.d_model, cfg.param_dtype
        self.dtype = jnp.dtype(cfg.dtype)
        self.recipe = cfg.gemm_recipe
        self.enorm = RMSNorm(d, eps=cfg.rms_eps, param_dtype=pd)
        self.hnorm = RMSNorm(d, eps=cfg.rms_eps, param_dtype=pd)
        self.eh_proj = linear_param((2 * d, d), 2 * d, pd, ("embed_concat", "embed"), rngs=rngs)
        self.block = Block(cfg, moe=cfg.n_moe_layers > 0, rngs=rngs)
        self.norm = RMSNorm(d, eps=cfg.rms_eps, param_dtype=pd)  # shared_head.norm

    def combine(self, h_prev: jax.Array, emb_ahead: jax.Array) -> jax.Array:
        """Eq. 21: h_prev, emb_ahead [b, t, d] -> the block's input [b, t, d]."""
        dt = self.dtype
        cat = jnp.concatenate([self.enorm(emb_ahead), self.hnorm(h_prev)], axis=-1).astype(dt)  # [b, t, 2d]
        return linear("btx,xd->btd", cat, self.eh_proj[...], dtype=dt, recipe=self.recipe)

    def __call__(
        self, h_prev: jax.Array, emb_ahead: jax.Array, positions, segment_ids, *, train: bool = False, ep=None
    ):
        """h_prev, emb_ahead [b, t, d] -> (h [b, t, d], normed h for the head, aux); ``train``, ``ep``:
        see ``MoE.__call__``."""
        h, aux = self.block(self.combine(h_prev, emb_ahead), positions, segment_ids, train=train, ep=ep)
        return h, self.norm(h), aux


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, i] <- x[:, i + k]; the last k positions get ``fill``. [b, t] -> [b, t]."""
    if k == 0:
        return x
    pad = jnp.full(x.shape[:1] + (k,) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)
