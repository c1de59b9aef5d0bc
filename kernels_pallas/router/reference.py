"""Router semantics (the config) and a plain-jnp reference.

DeepSeek-V3 report, Sec. 2.1.2 eq. 12-16 (sigmoid affinities, bias-adjusted top-k selection,
normalized gates) and Sec. 2.1.2 "auxiliary-loss-free load balancing"; node/group-limited routing
as in DeepSeek-V3's `inference/model.py` Gate and HF `DeepseekV3TopkRouter`:

  s = sigmoid(logits) | softmax(logits)          (f32)                       [t, e]
  c = s + bias                                   (bias only selects)         [t, e]
  if n_group > 1: group score = sum of the top-2 c in each group of e/n_group consecutive
                  experts; experts outside the top `topk_group` groups get c = -inf
  ids = top_k(c)                                 (ties: lowest index, as lax.top_k)
  gates = s[ids]; if norm_topk_prob: gates /= sum(gates) + 1e-20; gates *= routed_scaling_factor

(HF fills the dropped groups with 0.0 instead of -inf; the two differ only when a kept expert's
biased score is negative.)
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


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
  # Renormalize the selected gates to sum to one (before scaling).
  norm_topk_prob: bool = True
  # Multiplies the final gates.
  routed_scaling_factor: float = 1.0

  def __post_init__(self):
    if self.score_fn not in ("sigmoid", "softmax"):
      raise ValueError(f"score_fn must be 'sigmoid' or 'softmax', got {self.score_fn!r}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"need 1 <= top_k <= num_experts, got {self.top_k}, {self.num_experts}")
    if self.n_group > 1:
      if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
        raise ValueError("num_experts must split into n_group groups of at least 2 experts")
      if not 1 <= self.topk_group <= self.n_group:
        raise ValueError(f"need 1 <= topk_group <= n_group, got {self.topk_group}, {self.n_group}")
      if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
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


def route_reference(logits, bias, cfg: RouterConfig):
  """logits [t, e], bias [e] -> ids [t, k] int32, gates [t, k] f32, counts [e] int32."""
  t, e = logits.shape
  scores = scores_fn(logits, cfg)  # [t, e]
  choice = scores + bias.astype(jnp.float32)  # [t, e]
  if cfg.n_group > 1:
    grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)  # [t, n_group, e/n_group]
    group_scores = lax.top_k(grouped, 2)[0].sum(-1)  # [t, n_group]
    _, top_groups = lax.top_k(group_scores, cfg.topk_group)  # [t, topk_group]
    keep = jax.nn.one_hot(top_groups, cfg.n_group, dtype=jnp.int32).sum(1) > 0  # [t, n_group]
    keep = jnp.repeat(keep, e // cfg.n_group, axis=1)  # [t, e]
    choice = jnp.where(keep, choice, -jnp.inf)
  _, ids = lax.top_k(lax.stop_gradient(choice), cfg.top_k)  # [t, k]
  gates = gates_from_ids(scores, ids, cfg)
  counts = jnp.bincount(ids.reshape(-1), length=e).astype(jnp.int32)  # [e]
  return ids.astype(jnp.int32), gates, counts
