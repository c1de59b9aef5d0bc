"""DeepSeekMoE router (DeepSeek-V3 report Sec. 2.1.2, eq. 12-16; group-limited routing Sec. 2.1.2
"Node-Limited Routing" / DeepSeek-V2 Sec. 2.1.2 "Device-Limited Routing").

For token u_t [d] and expert centroids e_i:

  s_{i,t} = sigmoid(u_t . e_i)           (score_fn="sigmoid", V3)  or softmax_i(u_t . e_i) (V2)
  choice_{i,t} = s_{i,t} + b_i           b = the aux-loss-free selection bias, used to CHOOSE only
  group score = sum of the top-2 choice values (group_score="top2_sum", V3) or the max choice value
                (group_score="max", V2) in each of n_group groups; keep topk_group groups
  TopK over the kept groups' choice values -> k expert ids
  g_{i,t} = s_{i,t} / sum_{j in TopK} s_{j,t}   (if norm_topk_prob) ; then * routed_scaling_factor

The gate values never include b (eq. 16). The router's matmul, scores and gates are f32, as in
DeepSeek's code. Qwen-MoE (score_fn="softmax", n_group=1, use_aux_free_bias=False,
routed_scaling_factor=1) is exactly transformers' ``Qwen2MoeTopKRouter``: softmax in f32, top-k,
renormalised if norm_topk_prob (``tests/model/test_qwen_moe.py``). The selection itself is
``kernels_pallas/router``: its jnp ``route_reference`` (kernels_impl "scan" / "ragged_dot") or the
fused Pallas kernel ("pallas"), one switch (``kernels_pallas/backend.py``). ``Router`` holds the
centroids and the bias (a ``RouterBias`` variable, outside the optimizer, updated by
``model/balance.py``); it returns the per-expert load of its call instead of storing it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import backend
from kernels_pallas.router import ops as pallas_router
from kernels_pallas.router.reference import RouterConfig, route_reference, scores_fn
from model.config import ModelConfig
from model.params import linear_param


class RouterBias(nnx.Variable):
    """Aux-loss-free selection bias b_i [e]: updated by a rule, not by gradients."""


class Routing(NamedTuple):
    ids: jax.Array  # [m, k] int32 chosen experts
    gates: jax.Array  # [m, k] f32 combine weights
    scores: jax.Array  # [m, e] f32 s_{i,t} (for the sequence-wise balance loss)
    load: jax.Array  # [e] f32 assignments of the valid tokens per expert


def router_config(cfg: ModelConfig) -> RouterConfig:
    return RouterConfig(
        num_experts=cfg.n_routed_experts,
        top_k=cfg.n_experts_per_tok,
        score_fn=cfg.score_fn,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        group_score=cfg.group_score,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )


def route(logits: jax.Array, bias: jax.Array, cfg: ModelConfig, valid: jax.Array | None = None) -> Routing:
    """Routing from router logits [m, e] (f32), selection bias [e] and valid [m] bool (padding
    tokens are routed but not counted in the load; default all valid)."""
    rc = router_config(cfg)
    bias = bias if cfg.use_aux_free_bias else jnp.zeros_like(bias)
    valid = jnp.ones(logits.shape[:1], bool) if valid is None else valid
    if backend.resolve(cfg.kernels_impl) == "pallas":
        ids, gates, counts = pallas_router.route(logits, bias, rc, valid)
    else:
        ids, gates, counts = route_reference(logits, bias, rc, valid)
    return Routing(ids, gates, scores_fn(logits, rc), counts.astype(jnp.float32))


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e = cfg.n_routed_experts
        # Centroids kept in f32 whatever the param dtype: routing decisions are precision-sensitive.
        self.weight = linear_param(
            (cfg.d_model, e), cfg.d_model, jnp.float32, ("embed", "expert_replicated"), rngs=rngs
        )
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32))

    def __call__(self, x: jax.Array, valid: jax.Array) -> Routing:
        """x [m, d], valid [m] bool."""
        logits = jnp.einsum("md,de->me", x.astype(jnp.float32), self.weight[...])  # [m, e] f32
        return route(logits, self.bias[...], self.cfg, valid)
