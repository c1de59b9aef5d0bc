"""Dense reference of the MoE layer for the tests: every routed expert runs on every token and the
result is masked by the routing. Costs E times the activated FLOPs: never use it for training."""

import jax
import jax.numpy as jnp
import numpy as np

from model.dispatch import expert_capacity
from model.router import route


def dense_moe_reference(moe, x: jax.Array, segment_ids: jax.Array, *, train: bool = False) -> tuple[jax.Array, int]:
    """Same inputs as ``MoE.__call__`` on one device; returns (y [b, t, d], dropped count).

    With ``train`` and a capacity factor, capacity is applied by walking the assignments in token
    order, slot order.
    """
    cfg = moe.cfg
    b, t, d = x.shape
    m, e = b * t, cfg.n_routed_experts
    xt = x.reshape(m, d).astype(jnp.float32)
    valid = np.asarray(segment_ids.reshape(m) != 0)
    logits = xt @ moe.router.weight[...]
    r = route(logits, moe.router.bias[...], cfg.replace(kernels_impl="scan"))
    ids = np.asarray(r.ids)
    keep = np.zeros(ids.shape, bool)
    cap = expert_capacity(cfg.capacity_factor if train else None, m, cfg.n_experts_per_tok, e)
    used = np.zeros(e, int)
    for tok in range(m):
        for slot in range(ids.shape[1]):
            if not valid[tok]:
                continue
            ex = ids[tok, slot]
            if cap is None or used[ex] < cap:
                keep[tok, slot] = True
                used[ex] += 1
    dropped = int(valid.sum() * ids.shape[1] - keep.sum())
    out = jnp.zeros((m, d), jnp.float32)
    for ex in range(e):
        h = jax.nn.silu(xt @ moe.w_gate[ex]) * (xt @ moe.w_up[ex])
        y = h @ moe.w_down[ex]  # [m, d]: every token through expert ex
        w = jnp.sum(jnp.where((ids == ex) & keep, r.gates, 0.0), axis=-1)  # [m]
        out = out + w[:, None] * y
    if moe.shared is not None:
        s = moe.shared
        out = out + (jax.nn.silu(xt @ s.w_gate[...]) * (xt @ s.w_up[...])) @ s.w_down[...]
    return out.reshape(b, t, d), dropped
