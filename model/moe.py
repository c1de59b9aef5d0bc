"""DeepSeekMoE layer (DeepSeek-V3 report Sec. 2.1.2, eq. 12): shared experts plus fine-grained
routed experts, computed at the cost of the *activated* experts only.

  h'_t = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

Qwen-MoE (Qwen2 report arXiv 2407.10671 Sec. 2.2.2, Qwen3 report arXiv 2505.09388 Sec. 2) is the
same layer with a softmax router over all experts (``model/router.py``), no shared expert (Qwen3)
or, in Qwen2-MoE (``shared_expert_gate``), a shared part scaled per token by a scalar gate:

  h'_t = u_t + sigmoid(u_t . w_g) FFN^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

The routed part is one pipeline, ``routed``: router (``model/router.py``) -> dispatch (sort the
m*k (token, slot) assignments by expert into a buffer, ``model/dispatch.py``) -> experts (one
grouped matmul per SwiGLU projection over the buffer, ``model/grouped_matmul.py``, cost ~ m*k*d*f
instead of E*m*d*f) -> combine (each assignment's result back, mixed with the gates). Padding
tokens (segment 0) are routed but never dispatched nor counted.

On a device mesh (``ep``: ``model/moe_ep.py``) the same pipeline runs inside ``shard_map`` on each
device's own tokens; the buffer's destination blocks travel to the devices holding their experts
and back by all-to-all, and the statistics are summed over devices.

Dropless unless ``train=True`` and ``cfg.capacity_factor = C``: then each expert keeps at most
ceil(C * m * k / E) of a device's m tokens' assignments, first come first served in token order,
and the overflow (counted in ``aux["dropped"]``) contributes zero. Evaluation and generation never
drop: a row's output does not depend on the other rows of its batch.

``aux``: ``balance_loss`` (eq. 17-20, ``model/balance.py``), ``batch_balance_loss`` (the classic
batch-wise auxiliary loss, same file), ``dropped``, ``expert_load`` [1, e]
(assignments per expert over the global batch, for the aux-loss-free bias update and MaxVio).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import dispatch, moe_ep
from model.balance import batch_balance_loss, batch_balance_terms, sequence_balance_terms
from model.config import ModelConfig
from model.ffn import SwiGLU
from model.grouped_matmul import gmm
from model.linear import QuantizedWeight
from model.params import linear_param
from model.router import Router, route


def expert_swiglu(cfg: ModelConfig, x_sorted, group_sizes, w_gate, w_up, w_down) -> jax.Array:
    """SwiGLU of rows sorted by expert with weights [e, d, f], [e, d, f], [e, f, d]: [r, d] -> [r, d]."""
    dt = jnp.dtype(cfg.dtype)
    mm = functools.partial(
        gmm, group_sizes=group_sizes, impl=cfg.kernels_impl, tile=cfg.moe_block_rows, recipe=cfg.gemm_recipe
    )

    def cast(w):  # quantized recipes read the f32 master weights (f32 weight gradients) themselves;
        # gmm takes a kept-FP8 ``QuantizedWeight`` (model/fp8_weights.py) as is under every recipe
        return w if cfg.gemm_recipe != "bf16" or isinstance(w, QuantizedWeight) else w.astype(dt)

    g = mm(x_sorted, cast(w_gate))  # [r, f]
    u = mm(x_sorted, cast(w_up))  # [r, f]
    return mm(jax.nn.silu(g) * u, cast(w_down))  # [r, d]


def _remote_experts(cfg: ModelConfig, ep: moe_ep.ExpertParallel, x_buf, expert, weights):
    """Send each destination its block of the buffer, compute, send the results back: [n*R, d]."""
    e_local = cfg.n_routed_experts // ep.n
    recv = moe_ep.exchange(x_buf, ep)  # [n*R, d] rows from every source
    recv_e = moe_ep.exchange(expert, ep)  # [n*R] their local expert (e_local = empty)
    q = dispatch.plan(recv_e[:, None], recv_e < e_local, e_local, 1, None, recv_e.shape[0])
    y = expert_swiglu(cfg, dispatch.gather(recv, q.src, q.slot, 1), q.group_sizes, *weights)  # sorted by expert
    y = moe_ep.psum_mlp(dispatch.scatter_back(y, q.src, q.slot), ep)  # [n*R, d] in received order
    return moe_ep.exchange(y, ep)  # [n*R, d] my buffer's results


def routed(cfg: ModelConfig, capacity_factor, ep, x, valid, w_router, bias, w_gate, w_up, w_down):
    """Routed experts of x [b, t, d] (valid [b, t] bool) -> (out [b, t, d] f32, aux). With ``ep``
    this runs per device inside ``moe_ep.shard``: arguments are the device's shards."""
    b, t, d = x.shape
    m, k, e = b * t, cfg.n_experts_per_tok, cfg.n_routed_experts
    xt, v = x.reshape(m, d), valid.reshape(m)
    logits = jnp.einsum("md,de->me", xt.astype(jnp.float32), w_router)  # [m, e] f32
    r = route(logits, bias, cfg, v)  # ids, gates [m, k]; scores [m, e]; load [e]
    n = 1 if ep is None else ep.n
    cap = dispatch.expert_capacity(capacity_factor, m, k, e)
    p = dispatch.plan(r.ids, v, e, n, cap, dispatch.buffer_rows(m, k, e, n, cap))
    x_buf = dispatch.gather(xt, p.src, p.slot, k)  # [n*R, d]
    weights = (w_gate, w_up, w_down)
    if n > 1:
        y_buf = _remote_experts(cfg, ep, x_buf, p.local_expert, weights)
    else:
        y_buf = expert_swiglu(cfg, x_buf, p.group_sizes, *weights)  # [R, d]
        y_buf = y_buf if ep is None else moe_ep.psum_mlp(y_buf, ep)
    y = dispatch.scatter_back(y_buf, p.src, p.slot).reshape(m, k, d)  # [m, k, d]
    out = jnp.einsum("mkd,mk->md", y.astype(jnp.float32), r.gates)  # [m, d] f32
    stats = (*sequence_balance_terms(r.ids.reshape(b, t, k), r.scores.reshape(b, t, e), valid, e), p.dropped, r.load)
    stats += batch_balance_terms(r.scores, v)
    if ep is not None:
        stats = moe_ep.psum_batch(stats, ep)
    loss_sum, rows, dropped, load, score_sum, n_tok = stats
    aux = {
        "balance_loss": loss_sum / jnp.maximum(rows, 1.0),
        "batch_balance_loss": batch_balance_loss(load, score_sum, n_tok, k),
        "dropped": dropped,
        "expert_load": load[None],
    }
    return out.reshape(b, t, d), aux


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, d, f, pd = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim, cfg.param_dtype
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = linear_param((e, d, f), d, pd, ("expert", "embed", "expert_mlp"), rngs=rngs)
        self.w_up = linear_param((e, d, f), d, pd, ("expert", "embed", "expert_mlp"), rngs=rngs)
        self.w_down = linear_param((e, f, d), f, pd, ("expert", "expert_mlp", "embed"), rngs=rngs)
        self.shared = (
            SwiGLU(d, cfg.n_shared_experts * f, param_dtype=pd, dtype=cfg.dtype, rngs=rngs, recipe=cfg.gemm_recipe)
            if cfg.n_shared_experts > 0
            else None
        )
        # w_g [d, 1]: f32 like the router, whose precision-sensitive role it shares (Qwen2-MoE)
        self.shared_gate = (
            linear_param((d, 1), d, jnp.float32, ("embed", None), rngs=rngs) if cfg.shared_expert_gate else None
        )

    def shared_experts(self, x: jax.Array) -> jax.Array:
        """The shared part of x [..., d] (compute dtype): [..., d] f32, zero without shared experts."""
        if self.shared is None:
            return jnp.zeros(x.shape, jnp.float32)
        y = self.shared(x).astype(jnp.float32)
        if self.shared_gate is not None:
            gate = jnp.einsum("...d,do->...o", x.astype(jnp.float32), self.shared_gate[...])  # [..., 1]
            y = y * jax.nn.sigmoid(gate)
        return y

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, *, train: bool = False, ep: moe_ep.ExpertParallel | None = None
    ):
        """x [b, t, d], segment_ids [b, t] -> (y [b, t, d], aux). ``train``: apply the capacity
        factor; ``ep``: run expert-parallel on that mesh (else on this device)."""
        cfg = self.cfg
        xt = x.astype(jnp.dtype(cfg.dtype))
        body = functools.partial(routed, cfg, cfg.capacity_factor if train else None, ep)
        args = (
            xt,
            segment_ids != 0,
            self.router.weight[...],
            self.router.bias[...],
            self.w_gate[...],
            self.w_up[...],
            self.w_down[...],
        )
        if ep is not None and isinstance(args[4], QuantizedWeight):
            raise ValueError(
                "MoE: expert parallelism (ep) does not take kept-FP8 experts (from_pretrained keep_fp8=True)"
            )
        out, aux = body(*args) if ep is None else moe_ep.shard(body, ep, *args)
        return (out + self.shared_experts(xt)).astype(x.dtype), aux
