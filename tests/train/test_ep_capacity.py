"""Expert parallelism under skew and capacity (8 fake CPU devices, tests/conftest.py).

The MoE layer on an expert=4 x tensor=2 mesh (batch split in 4 blocks of 16 tokens, 2 of the 8
experts per destination, each expert's hidden width split in 2) against the dense reference
(``model/moe_reference.py``) with the first-come-first-served capacity each device applies to its
own tokens. Forward, drop counts, the kept (token, slot) assignments of ``dispatch.plan`` and
gradients, with every token forced onto one destination's experts.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import dispatch
from model.moe import MoE
from model.moe_ep import send_capacity
from model.moe_reference import dense_moe_reference, kept_assignments
from model.router import route
from tests.tolerances import assert_close
from tests.util import tiny_config
from train import sharding

B, T = 8, 8  # 4 batch blocks of 2 rows: m_local = 16 tokens per device


@pytest.fixture(scope="module")
def ep():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=4, tensor=2)))
    return sharding.expert_parallel(mesh)


def _layer(capacity_factor, bias):
    cfg = tiny_config(n_group=1, topk_group=1, capacity_factor=capacity_factor)
    moe = MoE(cfg, rngs=nnx.Rngs(3))
    moe.router.bias[...] = jnp.asarray(bias, jnp.float32)
    x = jax.random.normal(jax.random.key(4), (B, T, cfg.d_model))
    seg = jnp.ones((B, T), jnp.int32).at[5, -3:].set(0)  # padding in one block only
    return moe, x, seg


def _loss(y, seg):
    return jnp.sum(jnp.where(seg[..., None] != 0, jnp.tanh(y), 0.0))


def _run_on_mesh(moe, x, seg, ep):
    """(y, aux, d loss / d (moe, x)) of the layer in training mode, expert-parallel on ``ep``."""

    @nnx.jit
    def fwd_bwd(moe, x):
        def loss(moe, x):
            y, aux = moe(x, seg, train=True, ep=ep)
            return _loss(y, seg), (y, aux)

        (_, (y, aux)), g = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
        return y, aux, g

    return fwd_bwd(moe, x)


def _compare(moe, x, seg, ep):
    """Mesh run against the dense per-device reference; returns (reference keep [m, k], cap)."""
    cfg, shards = moe.cfg, math.prod(ep.mesh.shape[a] for a in ep.batch)
    y, aux, g = _run_on_mesh(moe, x, seg, ep)
    y_ref, dropped_ref = dense_moe_reference(moe, x, seg, train=True, shards=shards)
    valid = np.asarray(seg != 0)[..., None]
    assert_close(np.where(valid, y, 0), np.where(valid, y_ref, 0), composite=True)
    assert int(aux["dropped"]) == dropped_ref

    g_ref = nnx.grad(
        lambda m, x: _loss(dense_moe_reference(m, x, seg, train=True, shards=shards)[0], seg), argnums=(0, 1)
    )(moe, x)
    assert_close(g[1], g_ref[1], composite=True, err_msg="d input")
    flat_ref = dict(nnx.to_flat_state(nnx.state(g_ref[0], nnx.Param)))
    for path, gp in nnx.to_flat_state(nnx.state(g[0], nnx.Param)):
        assert_close(gp[...], flat_ref[path][...], composite=True, err_msg=str(path))

    # The reference's kept slots, against the plan each device makes of its own block.
    m_local = B * T // shards
    cap = dispatch.expert_capacity(cfg.capacity_factor, m_local, cfg.n_experts_per_tok, cfg.n_routed_experts)
    xt = x.reshape(B * T, -1)
    ids = np.asarray(route(xt @ moe.router.weight[...], moe.router.bias[...], cfg).ids)  # [m, k]
    v = np.asarray(seg).reshape(-1) != 0
    keep = kept_assignments(ids, v, cfg.n_routed_experts, cap, shards)
    rows = send_capacity(cfg, m_local, ep.n)
    for s in range(shards):
        blk = slice(s * m_local, (s + 1) * m_local)
        p = dispatch.plan(jnp.asarray(ids[blk]), jnp.asarray(v[blk]), cfg.n_routed_experts, ep.n, cap, rows)
        np.testing.assert_array_equal(np.asarray(p.slot).reshape(m_local, -1) < ep.n * rows, keep[blk])
    return ids, keep, rows


def _rows_per_destination(ids, keep, n):
    """Assignments each device sends each destination under the reference's ``keep``: [block, n]."""
    e_local = 8 // n
    dest = np.where(keep, ids // e_local, n).reshape(n, -1)  # [block, m_local * k]
    return np.stack([np.bincount(d, minlength=n + 1)[:n] for d in dest])


def test_skew_to_one_destination_stays_dropless(ep):
    """Biases send every token to experts 0 and 1, both on destination 0: without a capacity
    nothing is dropped, and destination 0's block of each device's send buffer is exactly full."""
    moe, x, seg = _layer(None, [100.0, 100.0] + [0.0] * 6)
    ids, keep, rows = _compare(moe, x, seg, ep)
    assert set(np.unique(ids)) == {0, 1} and keep.sum() == 2 * int((seg != 0).sum())
    per_dest = _rows_per_destination(ids, keep, ep.n)
    assert per_dest[:, 1:].sum() == 0 and per_dest[:, 0].max() == rows == 32, (per_dest, rows)


def test_capacity_drops_first_come_first_served_per_device(ep):
    """Capacity factor 1: each device keeps the first ceil(1 * 16 * 2 / 8) = 4 assignments of its
    own tokens per expert, in a send buffer of 2 * 4 = 8 rows per destination (a quarter of the
    dropless 32). Every token chooses experts 6 and 7 (destination 3): 4 of each device's 16 (13
    in the block with padding) are kept per expert, the rest drop and contribute zero."""
    moe, x, seg = _layer(1.0, [0.0, 0.3, -0.2, 0.1, 0.0, 0.0, 100.0, 100.0])
    ids, keep, rows = _compare(moe, x, seg, ep)
    assert set(np.unique(ids)) == {6, 7} and keep.sum() == 4 * 2 * 4
    per_dest = _rows_per_destination(ids, keep, ep.n)
    assert per_dest[:, :3].sum() == 0 and (per_dest[:, 3] == rows).all() and rows == 8, (per_dest, rows)
