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


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, k: int):
    """Targets and mask for MTP depth k (>= 1): position i predicts targets[i + k]. [b, t] each."""
    tgt = shift_left(targets, k)
    mask = shift_left(loss_mask, k) * (shift_left(segment_ids, k) == segment_ids) * (segment_ids != 0)
    return tgt, mask.astype(jnp.float32)


def loss_token_counts(batch: dict, mtp_depth: int) -> jax.Array:
    """[1 + D]: the valid tokens of the main loss and of each MTP depth's loss in ``batch``."""
    mask = batch["loss_mask"].astype(jnp.float32)
    mtp = [mtp_targets(batch["targets"], mask, batch["segment_ids"], k)[1].sum() for k in range(1, mtp_depth + 1)]
    return jnp.stack([mask.sum()] + mtp)


def lm_losses(out, batch: dict, mtp_weight: float, token_counts=None) -> dict:
    """Main and MTP losses (means over their valid tokens) from a ``ModelOutput`` and a batch.

    ``token_counts`` [1 + D] (``loss_token_counts``): the denominators; default this batch's own.
    Gradient accumulation passes the whole global batch's, so that the microbatches' losses sum to
    the global batch's mean (a mean of microbatch means would weight a token by its microbatch)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    depth = 0 if out.mtp_logits is None else out.mtp_logits.shape[0]
    if token_counts is None:
        token_counts = loss_token_counts(batch, depth)
    denom = jnp.maximum(token_counts, 1.0)  # [1 + D]
    nll = token_cross_entropy(out.logits, batch["targets"])
    losses = {"main_loss": jnp.sum(nll * mask) / denom[0], "nll_sum": jnp.sum(nll * mask), "n_tokens": jnp.sum(mask)}
    mtp = jnp.zeros((), jnp.float32)
    if depth:
        for k in range(1, depth + 1):
            tgt, m = mtp_targets(batch["targets"], mask, batch["segment_ids"], k)
            mtp = mtp + jnp.sum(token_cross_entropy(out.mtp_logits[k - 1], tgt) * m) / denom[k]
        mtp = mtp_weight * mtp / depth
    losses["mtp_loss"] = mtp
    return losses
