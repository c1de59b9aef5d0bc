"""Load balancing (DeepSeek-V3 report Sec. 2.1.2).

1. Auxiliary-loss-free balancing: after each optimizer step, every router's selection bias moves
   against its expert's load in that step's *global* batch:
       b_i <- b_i + gamma * sign(mean_j load_j - load_i)        (paper: gamma = 0.001)
   Outside the gradient; the loads come from the forward's ``aux["expert_load"]``.
2. Complementary sequence-wise balance loss (eq. 17-20), weight alpha (paper: 0.0001):
       f_i = N_r / (K_r T) * sum_t 1[i in TopK_t],  s'_{i,t} = s_{i,t} / sum_j s_{j,t},
       P_i = 1/T sum_t s'_{i,t},  L_Bal = alpha * sum_i f_i P_i
   computed per sequence (a packed row: its non-padding tokens) and averaged over rows.
3. Classic batch-wise auxiliary loss (GShard; Switch Transformer eq. 4; DeepSeek-V2 Sec. 3.2.1
   eq. 23-25): the same sum_i f_i P_i over all the global batch's tokens at once, with the usual
   weight ~0.01 (``train.aux_loss_alpha``; the aux-loss-free study, tools/study_balance.py):
       f_i = N_r / (K_r T) * load_i,  P_i = 1/T sum_t s'_{i,t},  T = valid tokens of the batch.
MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", Sec. 4) = max_i load_i / mean load - 1.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.router import Router


def sequence_balance_terms(ids: jax.Array, scores: jax.Array, valid: jax.Array, n_experts: int):
    """ids [b, t, k], scores [b, t, e], valid [b, t] -> (sum over rows of sum_i f_i P_i, rows with
    tokens): the loss is their ratio; sharded callers sum both over devices first."""
    k = ids.shape[-1]
    v = valid.astype(jnp.float32)  # [b, t]
    n_tok = v.sum(-1)  # [b]
    hits = jnp.zeros(ids.shape[:1] + (n_experts,), jnp.float32)
    hits = hits.at[jnp.arange(ids.shape[0])[:, None, None], ids].add(v[:, :, None])  # [b, e]
    f = jax.lax.stop_gradient(hits * n_experts / (k * jnp.maximum(n_tok, 1.0))[:, None])  # [b, e]
    s_norm = scores / (scores.sum(-1, keepdims=True) + 1e-20)  # [b, t, e]
    p = jnp.einsum("bte,bt->be", s_norm, v) / jnp.maximum(n_tok, 1.0)[:, None]  # [b, e]
    per_row = jnp.sum(f * p, axis=-1)  # [b]
    has = (n_tok > 0).astype(jnp.float32)
    return jnp.sum(per_row * has), has.sum()


def sequence_balance_loss(ids: jax.Array, scores: jax.Array, valid: jax.Array, n_experts: int) -> jax.Array:
    """ids [b, t, k], scores [b, t, e], valid [b, t] -> scalar sum_i f_i P_i averaged over rows."""
    total, rows = sequence_balance_terms(ids, scores, valid, n_experts)
    return total / jnp.maximum(rows, 1.0)


def batch_balance_terms(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """scores [m, e], valid [m] -> (sum_t s'_{i,t} over valid tokens [e], valid tokens): summed over
    devices with the loads before ``batch_balance_loss``."""
    v = valid.astype(jnp.float32)  # [m]
    s_norm = scores / (scores.sum(-1, keepdims=True) + 1e-20)  # [m, e]
    return jnp.einsum("me,m->e", s_norm, v), v.sum()


def batch_balance_loss(load: jax.Array, score_sum: jax.Array, n_tokens: jax.Array, k: int) -> jax.Array:
    """load [e] (assignments per expert), score_sum [e], n_tokens -> scalar sum_i f_i P_i of the batch."""
    e, n = load.shape[-1], jnp.maximum(n_tokens, 1.0)
    f = jax.lax.stop_gradient(load) * e / (k * n)  # [e]
    return jnp.sum(f * score_sum / n)


def routers(model: nnx.Module) -> list[Router]:
    """Every Router of a ``Transformer`` in forward order (main blocks, then MTP modules): the order
    of the rows of ``aux["expert_load"]``. A scanned block stack has one Router of [l, e] bias."""
    stacks = (model.dense_blocks, model.moe_blocks)
    blocks = [blk for s in stacks for blk in (list(s) if isinstance(s, nnx.List) else [s])]
    blocks += [m.block for m in model.mtp]
    return [blk.mlp.router for blk in blocks if blk.is_moe]


def load_shape(model: nnx.Module) -> tuple[int, int]:
    """Shape of ``aux["expert_load"]``: (routers' layers, e)."""
    return sum(r.bias[...].size // r.bias[...].shape[-1] for r in routers(model)), model.cfg.n_routed_experts


def update_router_biases(model: nnx.Module, loads: jax.Array, gamma: float) -> None:
    """Aux-loss-free update of every router's bias from ``loads`` [n_moe_layers (+ MTP), e]."""
    i = 0
    for r in routers(model):
        bias = r.bias[...]  # [e] or [l, e] when layers are scanned
        rows = bias.size // bias.shape[-1]
        load = loads[i : i + rows].reshape(bias.shape)
        i += rows
        r.bias[...] = bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)


def max_violation(loads: jax.Array) -> jax.Array:
    """MaxVio per layer: loads [l, e] -> [l]."""
    mean = loads.mean(-1)
    return jnp.where(mean > 0, loads.max(-1) / jnp.maximum(mean, 1e-9) - 1.0, 0.0)
