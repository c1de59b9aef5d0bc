"""Routed experts on a device mesh: expert parallelism with ``jax.shard_map`` + all-to-all.

``model/moe.py`` calls ``routed_experts`` when a mesh of more than one device is in context
(``jax.set_mesh``, as ``train/sharding.MeshJit`` does); the single-device path never comes here.
Routing (and so the router's per-expert ``load``, a global-batch count) happens before, on global
arrays; this file only moves tokens to their experts and back. Inside ``shard_map`` every device
holds m_l = m / (data * fsdp * expert) tokens and E_l = E / expert experts, the FFN hidden width
f split over ``tensor`` (mesh axis names: ``train/sharding.py``). With n = mesh ``expert`` size:

  1. sort the m_l * k local (token, slot) assignments by expert; expert i lives on device i // E_l
  2. pack them into a fixed buffer [n, C, d] (C rows per destination device; rows past C are
     dropped and counted); all_to_all over ``expert`` -> [n, C, d] rows from every source, each
     with its local expert id
  3. sort the received rows by local expert; grouped SwiGLU (``model.grouped_matmul.gmm``, cost of
     the rows actually received); psum the partial sums over ``tensor``
  4. reverse all_to_all, un-permute, mix the k slots with the gates

C: with ``capacity_factor = cf``, C = ceil(cf * m_l * k / n) (overflow is dropped per destination,
so drops differ from the single-device per-expert capacity); dropless (``capacity_factor=None``),
C = m_l * min(k, E_l), the worst case (every token sends all its slots that can share one device
to the same one), so nothing is ever dropped. Buffers are n times larger than the average;
``jax.lax.ragged_all_to_all`` (TPU/GPU) would send only the real rows, but XLA:CPU lacks it, so
this portable path is the one implemented and tested. With n = 1 (only data/fsdp/tensor axes)
there is no all-to-all: each device dispatches its own tokens to all experts (``dispatch_order``,
per-device capacity).
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig

_BATCH = ("data", "fsdp", "expert")  # train/sharding.BATCH_AXES; the model imports nothing from train/
_MESH_AXES = _BATCH + ("tensor",)

try:
    _shard_map = jax.shard_map
except AttributeError:  # jax < 0.7: only the experimental entry point
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def _shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def context_mesh():
    """The mesh in context if it is a training mesh of more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(_MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def send_capacity(cfg: ModelConfig, m_local: int, n: int) -> int:
    """Rows per destination device in the send buffer (see the module docstring)."""
    k, e_local = cfg.n_experts_per_tok, cfg.n_routed_experts // n
    if cfg.capacity_factor is None:
        return m_local * min(k, e_local)
    return max(1, int(math.ceil(cfg.capacity_factor * m_local * k / n)))


def _pack(ids, valid, n_experts: int, n: int, cap: int):
    """Sort assignments and give each a row of the [n * cap] send buffer.

    ids [m, k], valid [m] -> order [m*k] (sorted position -> flat assignment), slot [m*k] (buffer
    row of each sorted assignment; n*cap = not sent), local expert id [m*k], dropped (scalar).
    """
    mk, e_local = ids.size, n_experts // n
    valid_a = jnp.broadcast_to(valid[:, None], ids.shape).reshape(mk)
    key = jnp.where(valid_a, ids.reshape(mk), n_experts)  # sentinel E sorts last
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    dest = skey // e_local  # n for the sentinel
    counts = jnp.zeros((n + 1,), jnp.int32).at[dest].add(1)[:n]  # [n]
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(mk) - starts[jnp.minimum(dest, n - 1)]  # position inside its destination
    real = skey < n_experts
    keep = real & (rank < cap)
    slot = jnp.where(keep, dest * cap + rank, n * cap)
    return order, slot, skey % e_local, jnp.sum(real & ~keep).astype(jnp.int32)


def _local_experts(cfg: ModelConfig, x, local_ids, e_local: int, weights):
    """Grouped SwiGLU of rows x [r, d] with local expert ids [r] (e_local = empty row)."""
    from model.moe import expert_swiglu  # moe.py imports this file
    order = jnp.argsort(local_ids, stable=True)
    sizes = jnp.zeros((e_local + 1,), jnp.int32).at[local_ids].add(1)[:e_local]  # [E_l]
    y_sorted = expert_swiglu(cfg, x[order], sizes, *weights)  # [r, d]
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)


def _routed_local(cfg: ModelConfig, n: int, x, ids, gates, valid, w_gate, w_up, w_down):
    """Per-device body of ``routed_experts`` (arguments are this device's shards)."""
    from model.moe import dispatch_order, expert_capacity, expert_swiglu
    m, d = x.shape
    k = cfg.n_experts_per_tok
    weights = (w_gate, w_up, w_down)
    if n == 1:  # every expert is local: the single-device dispatch on this device's tokens
        order, sizes, dropped = dispatch_order(ids, valid, cfg.n_routed_experts, expert_capacity(cfg, m))
        y_sorted = expert_swiglu(cfg, x[order // k], sizes, *weights)  # [mk, d]
    else:
        cap = send_capacity(cfg, m, n)
        e_local = cfg.n_routed_experts // n
        order, slot, local_id, dropped = _pack(ids, valid, cfg.n_routed_experts, n, cap)
        send_x = jnp.zeros((n * cap + 1, d), x.dtype).at[slot].set(x[order // k])[:-1]  # [n*cap, d]
        send_e = jnp.full((n * cap + 1,), e_local, jnp.int32).at[slot].set(local_id)[:-1]
        recv_x = jax.lax.all_to_all(send_x.reshape(n, cap, d), "expert", 0, 0, tiled=True)
        recv_e = jax.lax.all_to_all(send_e.reshape(n, cap), "expert", 0, 0, tiled=True)
        y_recv = _local_experts(cfg, recv_x.reshape(n * cap, d), recv_e.reshape(n * cap), e_local, weights)
        y_recv = jax.lax.psum(y_recv, "tensor")  # sum over the f shards
        back = jax.lax.all_to_all(y_recv.reshape(n, cap, d), "expert", 0, 0, tiled=True)  # my send rows
        back = jnp.concatenate([back.reshape(n * cap, d), jnp.zeros((1, d), back.dtype)])
        y_sorted = back[slot]  # [mk, d] in sorted order; unsent rows read the zero row
    if n == 1:
        y_sorted = jax.lax.psum(y_sorted, "tensor")
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True).reshape(m, k, d)
    out = jnp.einsum("mkd,mk->md", y.astype(jnp.float32), gates)  # [m, d] f32
    return out, jax.lax.psum(dropped, _BATCH)


def routed_experts(cfg: ModelConfig, mesh, x, ids, gates, valid, w_gate, w_up, w_down):
    """Routed-expert output on ``mesh``: x [m, d], ids/gates [m, k], valid [m] (global arrays)
    -> (out [m, d] f32, dropped: global count of valid assignments that were not computed)."""
    n = dict(zip(mesh.axis_names, mesh.axis_sizes))["expert"]
    rows = P(_BATCH)
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    # check_vma=False: the grouped matmul's scan carries start as (mesh-invariant) zeros, which the
    # varying-manual-axes type check rejects; gradients are the same either way.
    fn = _shard_map(lambda *a: _routed_local(cfg, n, *a), mesh=mesh, check_vma=False,
                    in_specs=(rows, rows, rows, rows, w_in, w_in, w_out), out_specs=(rows, P()))
    return fn(x, ids, gates, valid, w_gate, w_up, w_down)
