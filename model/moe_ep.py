"""Expert parallelism: the ``jax.shard_map`` and the all-to-all transport of ``model/moe.py``.

``ExpertParallel`` says which mesh and which mesh axes: ``train/sharding.expert_parallel(mesh)``
builds it from the one rules table (``train/sharding.RULES``: "batch", "expert", "expert_mlp"), so
this file names no mesh axis. ``shard`` runs the MoE layer's routed part (router, dispatch, experts,
combine: ``model/moe.py``) on each device's own tokens: rows of the batch split over ``batch``,
experts over ``expert`` (n devices, E_l = E / n experts each), their hidden width f over ``mlp``.
Inside, ``exchange`` is the all-to-all over ``expert`` that sends each destination its block of the
dispatch buffer (``model/dispatch.py``) and brings the results back; ``psum_batch`` sums the
statistics (expert loads, drops, balance-loss terms) over the batch axes, so they are global.

The buffer has a fixed number of rows per destination (``dispatch.buffer_rows``: n times the
average when dropless). ``jax.lax.ragged_all_to_all`` (TPU/GPU) would send only the real rows, but
XLA:CPU lacks it, so this portable path is the one implemented and tested.
"""

import dataclasses
import math

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.dispatch import buffer_rows, expert_capacity

try:
    _shard_map = jax.shard_map
except AttributeError:  # jax < 0.7: only the experimental entry point
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def _shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """A mesh and the mesh axes of the logical axes the model's ``shard_map``-ed layers use (from
    ``train/sharding.RULES``): the MoE layer's all-to-all transport, and the splash attention kernel
    (``model/attention.py``, which reads ``mesh``, ``batch`` and ``heads``)."""

    mesh: Mesh
    batch: tuple[str, ...]  # rows of the batch (tokens)
    expert: tuple[str, ...]  # routed experts
    mlp: tuple[str, ...]  # each expert's hidden width f
    heads: tuple[str, ...] = ()  # attention heads (the splash kernel's shard_map, model/attention.py)

    @property
    def n(self) -> int:
        """Destinations of the all-to-all: the devices the experts are split over."""
        sizes = dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))
        return math.prod(sizes[a] for a in self.expert)


def send_capacity(cfg: ModelConfig, m_local: int, n: int) -> int:
    """Rows per destination of the training-time send buffer for m_local tokens on a device."""
    k, e = cfg.n_experts_per_tok, cfg.n_routed_experts
    return buffer_rows(m_local, k, e, n, expert_capacity(cfg.capacity_factor, m_local, k, e))


def exchange(x: jax.Array, ep: ExpertParallel) -> jax.Array:
    """All-to-all over the expert axes: x [n * rows, ...] (block j for destination j) -> [n * rows, ...]
    (block j from source j). Its own inverse."""
    return jax.lax.all_to_all(x, ep.expert, 0, 0, tiled=True)


def psum_batch(x, ep: ExpertParallel):
    return jax.lax.psum(x, ep.batch)


def psum_mlp(x, ep: ExpertParallel):
    """Sum of the partial products of the f shards."""
    return jax.lax.psum(x, ep.mlp)


def shard(fn, ep: ExpertParallel, x, valid, w_router, bias, w_gate, w_up, w_down):
    """``fn(x, valid, w_router, bias, w_gate, w_up, w_down) -> (y, aux)`` on each device's shards:
    x [b, t, d] and valid [b, t] split over the batch axes, the router replicated, expert weights
    [e, d, f] / [e, f, d] split over expert and f. ``y`` comes back split like x; ``aux`` (already
    summed over devices by ``fn``) replicated."""
    rows, rep = P(ep.batch), P()
    w_in, w_out = P(ep.expert, None, ep.mlp), P(ep.expert, ep.mlp, None)
    # check_vma=False: the grouped matmul's scan carries (mesh-invariant) zeros, which the
    # varying-manual-axes type check rejects; gradients are the same either way.
    return _shard_map(
        fn, mesh=ep.mesh, check_vma=False, in_specs=(rows, rows, rep, rep, w_in, w_in, w_out), out_specs=(rows, rep)
    )(x, valid, w_router, bias, w_gate, w_up, w_down)
