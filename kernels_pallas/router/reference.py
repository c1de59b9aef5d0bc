"""Router semantics (the config) and the plain-jnp routing, which is also the model's XLA path
(``model/router.py``).

DeepSeek-V3 report, Sec. 2.1.2 eq. 12-16 (sigmoid affinities, bias-adjusted top-k selection,
normalized gates) and Sec. 2.1.2 "auxiliary-loss-free load balancing"; node/group-limited routing
as in DeepSeek-V3's ``inference/model.py`` Gate and HF ``DeepseekV3TopkRouter`` (``noaux_tc``), or
DeepSeek-V2's device-limited routing (V2 report Sec. 2.1.2; HF ``group_limited_greedy``):

  s = sigmoid(logits) | softmax(logits)          (f32)                       [t, e]
  c = s + bias                                   (bias only selects)         [t, e]
  if n_group > 1: group score = sum of the top-2 c (group_score="top2_sum", V3) or the max c
                  (group_score="max", V2) in each group of e/n_group consecutive experts; experts
                  outside the top ``topk_group`` groups get c = -inf
  ids = top_k(c)                                 (ties: lowest index, as lax.top_k)
  gates = s[ids]; if norm_topk_prob: gates /= sum(gates) + 1e-20; gates *= routed_scaling_factor
  counts[i] = number of valid tokens that chose expert i

(HF fills the dropped groups with 0.0 instead of -inf; the two differ only when a kept expert's
biased score is negative.)
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

GROUP_SCORES = ("top2_sum", "max")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Routing hyperparameters (DeepSeek-V3: sigmoid, top_k=8, n_group=8, topk_group=4, norm on,
    routed_scaling_factor=2.5)."""

    num_experts: int
    top_k: int
    # "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2 / Mixtral-style).
    score_fn: str = "sigmoid"
    # Experts form n_group groups of num_experts / n_group consecutive experts; 1 disables it.
    n_group: int = 1
    # Groups each token may route to when n_group > 1.
    topk_group: int = 1
    # How a group is scored: "top2_sum" (V3's noaux_tc) or "max" (V2's group_limited_greedy).
    group_score: str = "top2_sum"
    # Renormalize the selected gates to sum to one (before scaling).
    norm_topk_prob: bool = True
    # Multiplies the final gates.
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.score_fn not in ("sigmoid", "softmax"):
            raise ValueError(f"score_fn must be 'sigmoid' or 'softmax', got {self.score_fn!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got {self.top_k}, {self.num_experts}")
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if self.num_experts % self.n_group or per_group < (2 if self.group_score == "top2_sum" else 1):
                raise ValueError("num_experts must split into n_group groups (of at least 2 experts for top2_sum)")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"need 1 <= topk_group <= n_group, got {self.topk_group}, {self.n_group}")
            if self.topk_group * per_group < self.top_k:
                raise ValueError("topk_group groups hold fewer than top_k experts")


def scores_fn(logits, cfg: RouterConfig):
    """Affinities s = sigmoid | softmax of the f32 logits [t, e]."""
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if cfg.score_fn == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def gates_from_ids(scores, ids, cfg: RouterConfig):
    """gates [t, k] = s[ids], normalized and scaled; differentiable in scores only."""
    gates = jnp.take_along_axis(scores, ids, axis=-1)  # [t, k]
    if cfg.norm_topk_prob:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return gates * cfg.routed_scaling_factor


def expert_counts(ids, valid, num_experts: int):
    """counts [e] int32 of the valid tokens' choices: ids [t, k], valid [t] bool."""
    w = jnp.broadcast_to(valid[:, None], ids.shape).astype(jnp.int32)  # [t, k]
    return jnp.zeros((num_experts,), jnp.int32).at[ids].add(w)


def route_reference(logits, bias, cfg: RouterConfig, valid=None):
    """logits [t, e], bias [e], valid [t] bool (default all) -> ids [t, k] int32, gates [t, k] f32,
    counts [e] int32."""
    t, e = logits.shape
    scores = scores_fn(logits, cfg)  # [t, e]
    choice = lax.stop_gradient(scores + bias.astype(jnp.float32))  # [t, e]
    if cfg.n_group > 1:
        grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)  # [t, g, e/g]
        if cfg.group_score == "top2_sum":
            group_scores = lax.top_k(grouped, 2)[0].sum(-1)  # [t, g]
        else:
            group_scores = grouped.max(-1)  # [t, g]
        _, top_groups = lax.top_k(group_scores, cfg.topk_group)  # [t, topk_group]
        keep = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
    _, ids = lax.top_k(choice, cfg.top_k)  # [t, k]
    ids = ids.astype(jnp.int32)
    valid = jnp.ones((t,), bool) if valid is None else valid
    return ids, gates_from_ids(scores, ids, cfg), expert_counts(ids, valid, e)
