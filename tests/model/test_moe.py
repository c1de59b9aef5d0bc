"""MoE layer against the dense loop over experts; grouped matmul against its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from model.grouped_matmul import gmm
from model.moe import MoE
from model.moe_reference import dense_moe_reference
from tests.tolerances import assert_close
from tests.util import tiny_config


def _inputs(cfg, b=2, t=12, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, cfg.d_model))
    seg = jnp.ones((b, t), jnp.int32).at[1, -3:].set(0)  # some padding
    return x, seg


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(n_shared_experts=0),
        dict(score_fn="softmax", n_group=1, topk_group=1),
        dict(n_experts_per_tok=1, moe_block_rows=4),
    ],
)
def test_moe_matches_dense_reference_forward_and_grad(kw):
    cfg = tiny_config(**kw)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    moe.router.bias[...] = jax.random.normal(jax.random.key(5), (cfg.n_routed_experts,)) * 0.1
    x, seg = _inputs(cfg)
    y, aux = moe(x, seg)
    y_ref, dropped = dense_moe_reference(moe, x, seg)
    valid = np.asarray(seg != 0)[..., None]
    assert_close(np.where(valid, y, 0), np.where(valid, y_ref, 0), composite=True)
    assert int(aux["dropped"]) == dropped == 0

    def loss_fast(m, x):
        return jnp.sum(jnp.where(seg[..., None] != 0, jnp.tanh(m(x, seg)[0]), 0.0))

    def loss_ref(m, x):
        return jnp.sum(jnp.where(seg[..., None] != 0, jnp.tanh(dense_moe_reference(m, x, seg)[0]), 0.0))

    gf = nnx.grad(loss_fast, argnums=(0, 1))(moe, x)
    gr = nnx.grad(loss_ref, argnums=(0, 1))(moe, x)
    assert_close(gf[1], gr[1], composite=True, err_msg="d input")
    flat_r = dict(nnx.to_flat_state(nnx.state(gr[0], nnx.Param)))
    for path, g in nnx.to_flat_state(nnx.state(gf[0], nnx.Param)):
        assert_close(g[...], flat_r[path][...], composite=True, err_msg=str(path))


def test_dropless_loses_no_token():
    """Every (valid token, slot) assignment is computed: the routed output equals the sum of its
    experts' outputs even when all tokens pick the same experts."""
    cfg = tiny_config(n_shared_experts=0, n_group=1, topk_group=1)
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    moe.router.bias[...] = jnp.zeros(cfg.n_routed_experts).at[:2].set(100.0)  # everyone -> experts 0, 1
    x, seg = _inputs(cfg, t=16)
    y, aux = moe(x, seg)
    assert int(aux["dropped"]) == 0
    y_ref, _ = dense_moe_reference(moe, x, seg)
    valid = np.asarray(seg != 0)[..., None]
    assert_close(np.where(valid, y, 0), np.where(valid, y_ref, 0), composite=True)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"])[0, :2], [int(valid.sum())] * 2)


def test_capacity_drops_exactly_the_overflow():
    cfg = tiny_config(n_shared_experts=0, n_group=1, topk_group=1, capacity_factor=1.0)
    moe = MoE(cfg, rngs=nnx.Rngs(2))
    moe.router.bias[...] = jnp.zeros(cfg.n_routed_experts).at[3].set(100.0)  # expert 3 overloaded
    x, seg = _inputs(cfg, b=2, t=16)
    y, aux = moe(x, seg, train=True)
    y_ref, dropped_ref = dense_moe_reference(moe, x, seg, train=True)
    m = x.shape[0] * x.shape[1]
    cap = int(np.ceil(1.0 * m * cfg.n_experts_per_tok / cfg.n_routed_experts))
    n_valid = int((seg != 0).sum())
    assert dropped_ref == n_valid - cap > 0  # expert 3 gets every valid token, keeps `cap`
    assert int(aux["dropped"]) == dropped_ref
    valid = np.asarray(seg != 0)[..., None]
    assert_close(np.where(valid, y, 0), np.where(valid, y_ref, 0), composite=True)


def _gmm_reference(lhs, rhs, sizes):
    ends = np.cumsum(sizes)
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float32)
    for g, (s, e) in enumerate(zip(ends - sizes, ends)):
        out[s:e] = lhs[s:e] @ rhs[g]
    return out


@settings(max_examples=12, deadline=None)
@given(data=st.data(), g=st.integers(1, 6), k=st.integers(1, 9), n=st.integers(1, 7), tile=st.sampled_from([1, 4, 8]))
def test_grouped_matmul_property(data, g, k, n, tile):
    sizes = np.array(data.draw(st.lists(st.integers(0, 9), min_size=g, max_size=g)), np.int32)
    m = int(sizes.sum()) + data.draw(st.integers(0, 5))  # padding rows after the groups
    if m == 0:
        m = 1
    rng = np.random.default_rng(int(sizes.sum()) + 7 * g)
    lhs = rng.normal(size=(m, k)).astype(np.float32)
    rhs = rng.normal(size=(g, k, n)).astype(np.float32)
    out = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tile=tile, impl="scan")
    assert_close(out, _gmm_reference(lhs, rhs, sizes))
    cot = rng.normal(size=(m, n)).astype(np.float32)
    _, vjp = jax.vjp(
        lambda a, b: gmm(a, b, jnp.asarray(sizes), tile=tile, impl="scan"), jnp.asarray(lhs), jnp.asarray(rhs)
    )
    d_lhs, d_rhs = vjp(jnp.asarray(cot))
    _, vjp_r = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, jnp.asarray(sizes)), jnp.asarray(lhs), jnp.asarray(rhs))
    r_lhs, r_rhs = vjp_r(jnp.asarray(cot))
    valid = np.arange(m)[:, None] < sizes.sum()
    assert_close(np.where(valid, d_lhs, 0), np.where(valid, r_lhs, 0), composite=True)
    assert_close(d_rhs, r_rhs, composite=True)


def test_pallas_gmm_backend_matches_xla():
    """The MoE layer with kernels_impl="pallas" (interpreted on CPU) equals the XLA path, forward and grads."""
    out = {}
    for impl in ("scan", "pallas"):
        cfg = tiny_config(kernels_impl=impl)
        moe = MoE(cfg, rngs=nnx.Rngs(0))
        x, seg = _inputs(cfg, t=8)
        loss = lambda m, x: jnp.sum(jnp.where(seg[..., None] != 0, jnp.tanh(m(x, seg)[0]), 0.0))
        val, grads = nnx.value_and_grad(loss, argnums=(0, 1))(moe, x)
        out[impl] = (val, grads[1], dict(nnx.to_flat_state(nnx.state(grads[0], nnx.Param))))
    assert_close(out["pallas"][0], out["scan"][0], composite=True)
    assert_close(out["pallas"][1], out["scan"][1], composite=True)
    for path, g in out["scan"][2].items():
        assert_close(out["pallas"][2][path][...], g[...], composite=True, err_msg=str(path))
