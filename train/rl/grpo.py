"""GRPO's math: group advantages, the clipped surrogate, the k3 KL, loss aggregation, log-probs.

DeepSeekMath (arXiv 2402.03300), Sec. 4.1, eq. 3 (outcome supervision, Sec. 4.1.2), as DeepSeek-R1
(arXiv 2501.12948, Sec. 2.2.1) uses it. For a prompt q the old policy samples a group of G
completions o_1..o_G with rewards r_1..r_G, and

    A_i     = (r_i - mean(r)) / std(r)                 (group-normalised advantage, every token of o_i)
    rho_i,t = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    L_i,t   = min(rho_i,t A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) A_i) - beta D_i,t
    D_i,t   = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1   (Schulman's k3 estimator, eq. 4)
    J       = mean_i (1/|o_i|) sum_t L_i,t                 aggregation "sequence" (GRPO)
            = sum_i,t L_i,t / sum_i |o_i|                    aggregation "token" (DAPO, arXiv 2503.14476 eq. 8)

and the loss is -J. Switches:

* ``scale_rewards="none"``: Dr. GRPO's unscaled A_i = r_i - mean(r) (Liu et al., arXiv 2503.20783,
  Sec. 3.1: dividing by std(r) over-weights groups that are nearly all right or all wrong).
* ``eps_high > eps_low``: DAPO's clip-higher (Sec. 3.1); equal by default.
* ``beta = 0``: no KL term; the trainer then keeps no reference model at all.
* masking of truncated completions (DAPO Sec. 3.3, "overlong filtering") is a [b, t] mask the
  trainer zeroes for rows that hit their token budget; masked rows add nothing to J.

std is the population std of the group (numpy's default) plus ``eps`` in the denominator, so a
group whose rewards are all equal gets A = 0 (it carries no signal), never NaN. This is also
where the group size must be >= 2: ``group_advantages`` refuses G = 1.

Shapes: b completions (prompt-major: rows g*G .. g*G+G-1 are prompt g's group), t completion
token positions, V vocabulary. Masks are float32 1/0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

SCALES = ("std", "none")
AGGREGATIONS = ("sequence", "token")


def check_group_size(group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"rl.group_size={group_size}: GRPO's advantage r_i - mean(group) is 0 for a group of one "
            f"(no baseline, no signal); use >= 2 samples per prompt"
        )


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "std", eps: float = 1e-4) -> jax.Array:
    """rewards [b] (b = prompts * G, prompt-major) -> advantages A [b] f32 (module doc)."""
    check_group_size(group_size)
    if scale not in SCALES:
        raise ValueError(f"rl.scale_rewards must be one of {SCALES}, got {scale!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)  # [n, G]
    centred = r - r.mean(-1, keepdims=True)
    if scale == "std":
        centred = centred / (r.std(-1, keepdims=True) + eps)
    return centred.reshape(-1)


def zero_variance_fraction(rewards: jax.Array, group_size: int) -> jax.Array:
    """Fraction of groups whose G rewards are all equal (A = 0 for all: no gradient from them)."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    return jnp.mean(jnp.all(r == r[:, :1], -1).astype(jnp.float32))


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from samples of pi_theta: exp(d) - d - 1,
    d = log pi_ref - log pi_theta (>= 0, unbiased; DeepSeekMath eq. 4)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def aggregate(per_token: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """[b, t] -> scalar: "sequence" = mean over rows of each row's token mean; "token" = mean over
    all unmasked tokens. A row with no unmasked token counts as 0 in "sequence" (and is still one
    of the b rows: masking a truncated completion shrinks the others' weight by nothing)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"rl.aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if how == "token":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    per_row = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)  # [b]
    return jnp.mean(per_row)


class LossOut(NamedTuple):
    loss: jax.Array  # scalar: -J
    clip_fraction: jax.Array  # fraction of unmasked tokens whose clipped branch was taken (no gradient)
    kl: jax.Array  # mean k3 KL over unmasked tokens (0 when beta = 0 / no reference)
    ratio_mean: jax.Array  # mean importance ratio over unmasked tokens


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_logp: Optional[jax.Array] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    aggregation: str = "sequence",
) -> LossOut:
    """-J of the module doc. logp, old_logp, ref_logp, mask [b, t]; advantages [b]."""
    eps_high = eps_low if eps_high is None else eps_high
    a = advantages[:, None]  # [b, 1]
    ratio = jnp.exp(logp - old_logp)  # [b, t]
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    surrogate = jnp.minimum(unclipped, clipped)  # [b, t]
    n = jnp.maximum(jnp.sum(mask), 1.0)
    if ref_logp is not None and beta:
        kl = k3_kl(logp, ref_logp)  # [b, t]
        per_token = surrogate - beta * kl
        kl_mean = jnp.sum(kl * mask) / n
    else:
        per_token, kl_mean = surrogate, jnp.zeros((), jnp.float32)
    was_clipped = (clipped < unclipped).astype(jnp.float32)  # the min took the flat (clipped) branch
    return LossOut(
        loss=-aggregate(per_token, mask, aggregation),
        clip_fraction=jnp.sum(was_clipped * mask) / n,
        kl=kl_mean,
        ratio_mean=jnp.sum(ratio * mask) / n,
    )


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """logits [b, t, V], targets [b, t] -> (log softmax(logits / T)[target] [b, t], entropy [b, t]).

    The same temperature as the sampler (``model/sampling.py``: ``warp``), so the ratio compares
    the policy that sampled with the policy that learns. The sampler's top-k / top-p truncation is
    not applied (as in TRL): with top_p < 1 the learner's probabilities are the untruncated ones."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)  # [b, t, V]
    chosen = jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]  # [b, t]
    entropy = -jnp.sum(jnp.exp(lp) * lp, -1)  # [b, t]
    return chosen, entropy


def sequence_logprobs(model, tokens: jax.Array, temperature: float = 1.0, ep=None) -> tuple[jax.Array, jax.Array]:
    """Training forward over prompt+completion rows ``tokens`` [b, L] (right-padded; padding is
    after every real token, so causal attention never lets it change a real position): the
    log-prob and entropy [b, L-1] of each next token tokens[:, 1:]. Dropless (``train=False``),
    as the sampler runs the model; ``ep``: the mesh's expert-parallel layout (``Transformer.__call__``)."""
    out = model(tokens[:, :-1], ep=ep)
    return token_logprobs(out.logits, tokens[:, 1:], temperature)
