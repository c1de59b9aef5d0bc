"""One pre-norm transformer block: x + MLA(norm(x)), then x + FFN(norm(x)), where FFN is a dense
SwiGLU (first ``first_k_dense`` blocks) or a DeepSeekMoE layer (DeepSeek-V3 report Sec. 2.1)."""

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.ffn import SwiGLU
from model.mla import MLA
from model.moe import MoE
from model.norms import RMSNorm


def zero_aux(n_experts: int) -> dict:
    """The aux of a block without routed experts (``MoE.__call__`` lists the keys)."""
    return {
        "balance_loss": jnp.zeros((), jnp.float32),
        "dropped": jnp.zeros((), jnp.int32),
        "expert_load": jnp.zeros((0, n_experts), jnp.float32),
    }


def add_aux(a: dict, b: dict) -> dict:
    """Aux of two blocks in forward order: statistics summed, expert loads stacked."""
    return {k: jnp.concatenate([a[k], b[k]]) if k == "expert_load" else a[k] + b[k] for k in a}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        self.is_moe = moe
        self.n_experts = cfg.n_routed_experts
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=cfg.param_dtype)
        self.attn = MLA(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=cfg.param_dtype)
        self.mlp = (
            MoE(cfg, rngs=rngs)
            if moe
            else SwiGLU(
                cfg.d_model,
                cfg.dense_ffn_dim,
                param_dtype=cfg.param_dtype,
                dtype=cfg.dtype,
                rngs=rngs,
                recipe=cfg.gemm_recipe,
            )
        )

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, train: bool = False, ep=None):
        """x [b, t, d] -> (x [b, t, d], aux); ``train``, ``ep``: see ``MoE.__call__``."""
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, ep=ep).astype(x.dtype)
        h = self.mlp_norm(x)
        if self.is_moe:
            y, aux = self.mlp(h, segment_ids, train=train, ep=ep)
        else:
            y, aux = self.mlp(h), zero_aux(self.n_experts)
        return x + y.astype(x.dtype), aux
