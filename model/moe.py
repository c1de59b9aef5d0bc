"""DeepSeekMoE layer (DeepSeek-V3 report Sec. 2.1.2, eq. 12): shared experts plus fine-grained
routed experts, computed at the cost of the *activated* experts only.

  h'_t = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

Dispatch ("sort, group, unsort"): the m*k (token, slot) assignments are sorted by expert id, each
expert's rows multiply that expert's weights in one grouped matmul (``model/grouped_matmul.py``,
cost ~ m*k*d*f instead of E*m*d*f), and the results are put back in (token, slot) order and mixed
with the gates. Padding tokens (segment 0) are not dispatched at all.

On a mesh of more than one device (``jax.set_mesh``), the routed experts run in
``model/moe_ep.py`` instead: expert parallelism with ``shard_map`` and all-to-all.

Dropless by default. With ``capacity_factor = C``, each expert takes at most ceil(C * m * k / E)
assignments, first come first served in token order; the overflow is dropped (those slots
contribute zero, the token keeps its shared experts and residual) and counted in ``dropped``.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.balance import sequence_balance_loss
from model.config import ModelConfig
from model.ffn import SwiGLU
from model import moe_ep
from model.grouped_matmul import gmm
from model.params import linear_param
from model.router import Router


def _grouped(cfg: ModelConfig):
    """The grouped-matmul backend named by ``cfg.kernels_impl``.

    "xla": ``model/grouped_matmul.py`` (tiled scan on CPU, ``ragged_dot`` on GPU/TPU); "pallas": the
    Pallas kernel ``kernels_pallas/gmm`` (compiled on TPU, interpreted elsewhere: for tests);
    "auto": Pallas on TPU, XLA elsewhere (the Pallas gmm has no GPU lowering yet).
    """
    impl = cfg.kernels_impl
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "tpu" else "xla"
    if impl == "pallas":
        from kernels_pallas.gmm import ops as gmm_ops
        return lambda lhs, rhs, sizes: gmm_ops.gmm(lhs, rhs, sizes, impl="pallas")
    return lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, tile=cfg.moe_block_rows)


def dispatch_order(ids: jax.Array, valid: jax.Array, n_experts: int, capacity: int | None):
    """Sort the flattened assignments by expert.

    ids [m, k], valid [m] -> (order [m*k]: sorted position -> flat assignment index,
    group_sizes [e] rows each expert computes, dropped: scalar count of valid assignments dropped).
    Invalid (padding) and dropped assignments are sorted past the last group: the grouped matmul
    treats them as padding rows and returns zeros for them.
    """
    mk = ids.size
    valid_a = jnp.broadcast_to(valid[:, None], ids.shape).reshape(mk)  # [m*k]
    key = jnp.where(valid_a, ids.reshape(mk), n_experts)  # sentinel e for padding
    order = jnp.argsort(key, stable=True)  # [m*k]
    sorted_key = key[order]
    counts = jnp.zeros((n_experts + 1,), jnp.int32).at[sorted_key].add(1)[:n_experts]  # [e]
    if capacity is None:
        return order, counts, jnp.zeros((), jnp.int32)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(mk) - starts[jnp.minimum(sorted_key, n_experts - 1)]  # rank inside its expert
    keep = (sorted_key < n_experts) & (pos < capacity)
    dropped = jnp.sum((sorted_key < n_experts) & ~keep).astype(jnp.int32)
    order = order[jnp.argsort(jnp.where(keep, sorted_key, n_experts), stable=True)]
    return order, jnp.minimum(counts, capacity), dropped


def expert_capacity(cfg: ModelConfig, m: int) -> int | None:
    if cfg.capacity_factor is None:
        return None
    return int(math.ceil(cfg.capacity_factor * m * cfg.n_experts_per_tok / cfg.n_routed_experts))


def expert_swiglu(cfg: ModelConfig, x_sorted, group_sizes, w_gate, w_up, w_down) -> jax.Array:
    """SwiGLU of rows sorted by expert with weights [e, d, f], [e, d, f], [e, f, d]: [r, d] -> [r, d]."""
    dt = jnp.dtype(cfg.dtype)
    mm = _grouped(cfg)
    g = mm(x_sorted, w_gate.astype(dt), group_sizes)  # [r, f]
    u = mm(x_sorted, w_up.astype(dt), group_sizes)  # [r, f]
    return mm(jax.nn.silu(g) * u, w_down.astype(dt), group_sizes)  # [r, d]


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, d, f, pd = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim, cfg.param_dtype
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = linear_param((e, d, f), d, pd, ("expert", "embed", "expert_mlp"), rngs=rngs)
        self.w_up = linear_param((e, d, f), d, pd, ("expert", "embed", "expert_mlp"), rngs=rngs)
        self.w_down = linear_param((e, f, d), f, pd, ("expert", "expert_mlp", "embed"), rngs=rngs)
        self.shared = (SwiGLU(d, cfg.n_shared_experts * f, param_dtype=pd, dtype=cfg.dtype, rngs=rngs)
                       if cfg.n_shared_experts > 0 else None)

    def routed_experts(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """SwiGLU per expert on rows sorted by expert: [m*k, d] -> [m*k, d]."""
        return expert_swiglu(self.cfg, x_sorted, group_sizes, self.w_gate[...], self.w_up[...], self.w_down[...])

    def __call__(self, x: jax.Array, segment_ids: jax.Array):
        """x [b, t, d], segment_ids [b, t] -> (y [b, t, d], aux {balance_loss, dropped})."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, d = x.shape
        m, k = b * t, cfg.n_experts_per_tok
        xt = x.reshape(m, d).astype(dt)
        valid = segment_ids.reshape(m) != 0  # [m]
        r = self.router(xt, valid)  # ids, gates [m, k]; scores [m, e]
        mesh = moe_ep.context_mesh()
        if mesh is not None:  # several devices: expert-parallel dispatch
            out, dropped = moe_ep.routed_experts(cfg, mesh, xt, r.ids, r.gates, valid,
                                                 self.w_gate[...], self.w_up[...], self.w_down[...])
        else:
            order, group_sizes, dropped = dispatch_order(r.ids, valid, cfg.n_routed_experts, expert_capacity(cfg, m))
            x_sorted = xt[order // k]  # [mk, d]
            y_sorted = self.routed_experts(x_sorted, group_sizes)  # [mk, d]
            y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(m, k, d)
            out = jnp.einsum("mkd,mk->md", y.astype(jnp.float32), r.gates)  # [m, d] f32
        if self.shared is not None:
            out = out + self.shared(xt).astype(jnp.float32)
        aux = {
            "balance_loss": sequence_balance_loss(r.ids.reshape(b, t, k), r.scores.reshape(b, t, -1),
                                                  valid.reshape(b, t), cfg.n_routed_experts),
            "dropped": dropped,
        }
        return out.reshape(b, t, d).astype(x.dtype), aux
