"""Load balancing (DeepSeek-V3 report Sec. 2.1.2).

1. Auxiliary-loss-free balancing: after each optimizer step, every router's selection bias moves
   against its expert's load in that step's *global* batch:
       b_i <- b_i + gamma * sign(mean_j load_j - load_i)        (paper: gamma = 0.001)
   Outside the gradient; ``update_router_biases`` applies it in place.
2. Complementary sequence-wise balance loss (eq. 17-20), weight alpha (paper: 0.0001):
       f_i = N_r / (K_r T) * sum_t 1[i in TopK_t],  s'_{i,t} = s_{i,t} / sum_j s_{j,t},
       P_i = 1/T sum_t s'_{i,t},  L_Bal = alpha * sum_i f_i P_i
   computed per sequence (a packed row: its non-padding tokens) and averaged over rows.
MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", Sec. 4) = max_i load_i / mean load - 1.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model.router import ExpertLoad, Router


def sequence_balance_loss(ids: jax.Array, scores: jax.Array, valid: jax.Array, n_experts: int) -> jax.Array:
    """ids [b, t, k], scores [b, t, e], valid [b, t] -> scalar sum_i f_i P_i averaged over rows."""
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
    return jnp.sum(per_row * has) / jnp.maximum(has.sum(), 1.0)


def routers(model: nnx.Module) -> list[Router]:
    """Every Router in the model, main blocks first, then MTP modules (graph order)."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, Router)]


def update_router_biases(model: nnx.Module, gamma: float) -> None:
    """Aux-loss-free update from each router's ``load`` (set by the last forward over the global batch)."""
    for r in routers(model):
        load = r.load[...]  # [e] or [l, e] when layers are scanned
        mean = load.mean(-1, keepdims=True)
        r.bias[...] = r.bias[...] + gamma * jnp.sign(mean - load)


def expert_loads(model: nnx.Module) -> jax.Array:
    """[n_moe_layers (+ MTP), e] assignment counts of the last forward."""
    rows = [r.load[...].reshape(-1, r.load[...].shape[-1]) for r in routers(model)]
    return jnp.concatenate(rows, axis=0)


def max_violation(loads: jax.Array) -> jax.Array:
    """MaxVio per layer: loads [l, e] -> [l]."""
    mean = loads.mean(-1)
    return jnp.where(mean > 0, loads.max(-1) / jnp.maximum(mean, 1e-9) - 1.0, 0.0)


__all__ = ["sequence_balance_loss", "update_router_biases", "expert_loads", "max_violation", "routers", "ExpertLoad"]
