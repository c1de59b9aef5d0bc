"""DeepSeekMoE router (DeepSeek-V3 report Sec. 2.1.2, eq. 12-16; group-limited routing Sec. 2.1.2
"Node-Limited Routing" / DeepSeek-V2 Sec. 2.1.2 "Device-Limited Routing").

For token u_t [d] and expert centroids e_i:

  s_{i,t} = sigmoid(u_t . e_i)           (score_fn="sigmoid", V3)  or softmax_i(u_t . e_i) (V2)
  choice_{i,t} = s_{i,t} + b_i           b = the aux-loss-free selection bias, used to CHOOSE only
  group score = sum of the top-2 choice values in each of n_group groups; keep topk_group groups
  TopK over the kept groups' choice values -> k expert ids
  g_{i,t} = s_{i,t} / sum_{j in TopK} s_{j,t}   (if norm_topk_prob) ; then * routed_scaling_factor

The gate values never include b (eq. 16). The router's matmul, scores and gates are f32, as in
DeepSeek's code. ``route`` is the pure function; ``Router`` holds the centroids, the bias (an
``RouterBias`` variable, outside the optimizer), and the per-expert load of its last call (an
``ExpertLoad`` variable, read by ``model/balance.py`` for the bias update and the MaxVio metric).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.params import linear_param


class RouterBias(nnx.Variable):
    """Aux-loss-free selection bias b_i [e]: updated by a rule, not by gradients."""


class ExpertLoad(nnx.Variable):
    """Assignments per expert [e] (f32 counts) in the router's most recent forward call."""


class Routing(NamedTuple):
    ids: jax.Array  # [m, k] int32 chosen experts
    gates: jax.Array  # [m, k] f32 combine weights
    scores: jax.Array  # [m, e] f32 s_{i,t} (for the sequence-wise balance loss)


def route(logits: jax.Array, bias: jax.Array, cfg: ModelConfig) -> Routing:
    """Pure routing from router logits [m, e] (f32) and selection bias [e]."""
    m, e = logits.shape
    if cfg.score_fn == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)  # [m, e]
    choice = jax.lax.stop_gradient(scores + bias[None, :] if cfg.use_aux_free_bias else scores)
    if cfg.n_group > 1:
        grouped = choice.reshape(m, cfg.n_group, e // cfg.n_group)  # [m, g, e/g]
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [m, g]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # [m, topk_group]
        group_mask = jnp.zeros((m, cfg.n_group), bool).at[jnp.arange(m)[:, None], keep].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(m, e)
    _, ids = jax.lax.top_k(choice, cfg.n_experts_per_tok)  # [m, k]
    gates = jnp.take_along_axis(scores, ids, axis=-1)  # [m, k], no bias
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    gates = gates * cfg.routed_scaling_factor
    return Routing(ids.astype(jnp.int32), gates, scores)


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e = cfg.n_routed_experts
        # Centroids kept in f32 whatever the param dtype: routing decisions are precision-sensitive.
        self.weight = linear_param((cfg.d_model, e), cfg.d_model, jnp.float32, ("embed", "expert_replicated"), rngs=rngs)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
        self.load = ExpertLoad(jnp.zeros((e,), jnp.float32))

    def __call__(self, x: jax.Array, valid: jax.Array) -> Routing:
        """x [m, d], valid [m] bool (padding tokens are routed but not counted in the load)."""
        logits = jnp.einsum("md,de->me", x.astype(jnp.float32), self.weight[...])  # [m, e] f32
        r = route(logits, self.bias[...], self.cfg)
        w = jnp.broadcast_to(valid[:, None], r.ids.shape).astype(jnp.float32)  # [m, k]
        self.load[...] = jnp.zeros((self.cfg.n_routed_experts,), jnp.float32).at[r.ids].add(w)
        return r
