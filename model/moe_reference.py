"""Dense reference of the MoE layer for the tests: every routed expert runs on every token and the
result is masked by the routing. Costs E times the activated FLOPs: never use it for training."""

import jax
import jax.numpy as jnp
import numpy as np

from model.dispatch import expert_capacity
from model.router import route


def kept_assignments(ids: np.ndarray, valid: np.ndarray, n_experts: int, capacity: int | None, shards: int = 1):
    """First come, first served: which (token, slot) assignments are computed. ids [m, k] experts,
    valid [m] bool -> keep [m, k] bool. The m tokens are ``shards`` consecutive blocks (the devices
    of an expert-parallel mesh, each holding its own rows); each block walks its assignments in
    token order, slot order, and an expert keeps the first ``capacity`` of them (None: all)."""
    m, k = ids.shape
    keep = np.zeros((m, k), bool)
    for block in np.split(np.arange(m), shards):
        used = np.zeros(n_experts, int)
        for tok in block:
            for slot in range(k):
                ex = ids[tok, slot]
                if valid[tok] and (capacity is None or used[ex] < capacity):
                    keep[tok, slot] = True
                    used[ex] += 1
    return keep


def dense_moe_reference(
    moe, x: jax.Array, segment_ids: jax.Array, *, train: bool = False, shards: int = 1
) -> tuple[jax.Array, int]:
    """Same inputs as ``MoE.__call__``; returns (y [b, t, d], dropped count).

    With ``train`` and a capacity factor, capacity is applied by ``kept_assignments``: on one device
    (``shards=1``), or as on an expert-parallel mesh whose batch axes split the b rows into
    ``shards`` blocks, each device applying the capacity of its own b/shards rows.
    """
    cfg = moe.cfg
    b, t, d = x.shape
    m, e = b * t, cfg.n_routed_experts
    xt = x.reshape(m, d).astype(jnp.float32)
    valid = np.asarray(segment_ids.reshape(m) != 0)
    logits = xt @ moe.router.weight[...]
    r = route(logits, moe.router.bias[...], cfg.replace(kernels_impl="scan"))
    ids = np.asarray(r.ids)
    cap = expert_capacity(cfg.capacity_factor if train else None, m // shards, cfg.n_experts_per_tok, e)
    keep = kept_assignments(ids, valid, e, cap, shards)
    dropped = int(valid.sum() * ids.shape[1] - keep.sum())
    out = jnp.zeros((m, d), jnp.float32)
    for ex in range(e):
        h = jax.nn.silu(xt @ moe.w_gate[ex]) * (xt @ moe.w_up[ex])
        y = h @ moe.w_down[ex]  # [m, d]: every token through expert ex
        w = jnp.sum(jnp.where((ids == ex) & keep, r.gates, 0.0), axis=-1)  # [m]
        out = out + w[:, None] * y
    if moe.shared is not None:
        s = moe.shared
        y = (jax.nn.silu(xt @ s.w_gate[...]) * (xt @ s.w_up[...])) @ s.w_down[...]  # [m, d]
        out = out + (y if moe.shared_gate is None else jax.nn.sigmoid(xt @ moe.shared_gate[...]) * y)
    return out.reshape(b, t, d), dropped
