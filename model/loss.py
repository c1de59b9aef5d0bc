"""Training losses: next-token cross-entropy and the MTP loss (DeepSeek-V3 report Sec. 2.2, eq. 24-25).

L_Main = CE(logits, targets) over tokens with loss_mask
L_MTP^k = CE(P^k_i, t_{i+k+1}) over positions i whose target t_{i+k+1} = targets[i+k] exists,
          belongs to the same packed document (segment_ids[i+k] == segment_ids[i]) and is not padding
L_MTP  = lambda / D * sum_k L_MTP^k
"""

import jax
import jax.numpy as jnp

from model.mtp import shift_left


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] f32, targets [...] -> per-token negative log-likelihood [...] (nats)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - gold


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, k: int):
    """Targets and mask for MTP depth k (>= 1): position i predicts targets[i + k]. [b, t] each."""
    tgt = shift_left(targets, k)
    mask = shift_left(loss_mask, k) * (shift_left(segment_ids, k) == segment_ids) * (segment_ids != 0)
    return tgt, mask.astype(jnp.float32)


def lm_losses(out, batch: dict, mtp_weight: float) -> dict:
    """Main and MTP losses (means over their valid tokens) from a ``ModelOutput`` and a batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = token_cross_entropy(out.logits, batch["targets"])
    losses = {"main_loss": masked_mean(nll, mask), "nll_sum": jnp.sum(nll * mask), "n_tokens": jnp.sum(mask)}
    mtp = jnp.zeros((), jnp.float32)
    if out.mtp_logits is not None:
        depth = out.mtp_logits.shape[0]
        for k in range(1, depth + 1):
            tgt, m = mtp_targets(batch["targets"], mask, batch["segment_ids"], k)
            mtp = mtp + masked_mean(token_cross_entropy(out.mtp_logits[k - 1], tgt), m)
        mtp = mtp_weight * mtp / depth
    losses["mtp_loss"] = mtp
    return losses
