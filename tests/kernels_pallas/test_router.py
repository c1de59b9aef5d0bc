"""Fused router kernel (interpret mode) vs the jnp reference: ids, gates, counts (padding masked); the
kernel's VJP and the reference's autodiff vs a closed-form gate gradient written in this file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.router import BlockSizes, RouterConfig, route, route_reference
from tests.tolerances import assert_close

CONFIGS = [
    RouterConfig(num_experts=16, top_k=4),  # sigmoid, no groups
    RouterConfig(num_experts=16, top_k=3, score_fn="softmax", norm_topk_prob=False),
    RouterConfig(num_experts=32, top_k=6, n_group=8, topk_group=3, routed_scaling_factor=2.5),
    RouterConfig(
        num_experts=24,
        top_k=4,
        score_fn="softmax",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
    ),
    RouterConfig(
        num_experts=24, top_k=4, score_fn="softmax", n_group=4, topk_group=2, group_score="max", norm_topk_prob=False
    ),  # DeepSeek-V2's group_limited_greedy
]
TOKENS = [8, 37]  # 37: a ragged last token block (bt = 16)


def _kernel(cfg, valid=None):
    return lambda x, b: route(x, b, cfg, valid, block_sizes=BlockSizes(16))


def _gate_vjp_closed_form(logits, ids, cot, cfg) -> np.ndarray:
    """d(sum cot * gates) / d logits in float64 from the gate's formula (V3 report eq. 13-15),
    written out by hand: g_j = R s_j / (S + 1e-20), S = sum of the selected s (norm_topk_prob), or
    g_j = R s_j; s = sigmoid(x) (ds_m/dx_m = s_m (1 - s_m)) or softmax(x) (ds/dx^T u = s (u - s.u)).
    The selection (ids) is a constant of the backward pass."""
    x, ids, c = (np.asarray(a, np.float64) for a in (logits, ids, cot))
    ids = ids.astype(np.int64)
    if cfg.score_fn == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-x))
    else:
        s = np.exp(x - x.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    sel = np.take_along_axis(s, ids, -1)  # [t, k]
    r = cfg.routed_scaling_factor
    if cfg.norm_topk_prob:
        tot = sel.sum(-1, keepdims=True) + 1e-20
        d_sel = r * (c / tot - (c * sel).sum(-1, keepdims=True) / tot**2)  # [t, k]
    else:
        d_sel = r * c
    u = np.zeros_like(s)  # dL/ds [t, e]: only the selected experts
    np.put_along_axis(u, ids, d_sel, -1)
    if cfg.score_fn == "sigmoid":
        return u * s * (1.0 - s)
    return s * (u - (u * s).sum(-1, keepdims=True))


def _check(cfg, logits, bias, cot):
    valid = jnp.arange(logits.shape[0]) % 5 != 3  # some padding tokens: not counted
    ids, gates, counts = _kernel(cfg, valid)(logits, bias)
    ids_ref, gates_ref, counts_ref = route_reference(logits, bias, cfg, valid)
    np.testing.assert_array_equal(ids, ids_ref)
    assert_close(gates, gates_ref, jnp.float32)
    np.testing.assert_array_equal(counts, counts_ref)
    grads = jax.vjp(lambda x, b: _kernel(cfg)(x, b)[1], logits, bias)[1](cot)
    grads_ref = jax.vjp(lambda x, b: route_reference(x, b, cfg)[1], logits, bias)[1](cot)
    want = _gate_vjp_closed_form(logits, ids_ref, cot, cfg)
    assert_close(grads[0], want, jnp.float32, err_msg="kernel VJP vs closed form")
    assert_close(grads_ref[0], want, jnp.float32, err_msg="reference (XLA path) autodiff vs closed form")
    assert not np.asarray(grads[1]).any() and not np.asarray(grads_ref[1]).any(), "bias gets no grad"


@settings(max_examples=10, deadline=None)
@given(
    cfg=st.sampled_from(CONFIGS),
    t=st.sampled_from(TOKENS),
    seed=st.integers(0, 2**16),
    bias_scale=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_router_matches_reference(cfg, t, seed, bias_scale):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(k1, (t, cfg.num_experts), jnp.float32)
    bias = bias_scale * jax.random.normal(k2, (cfg.num_experts,), jnp.float32)
    _check(cfg, logits, bias, jax.random.normal(k3, (t, cfg.top_k), jnp.float32))


@pytest.mark.parametrize("cfg", CONFIGS[1:3] + CONFIGS[4:])
def test_router_ties_pick_lowest_index(cfg):
    """Integer logits make exact ties in expert and group scores; both sides must agree (lax.top_k)."""
    logits = jax.random.randint(jax.random.key(0), (37, cfg.num_experts), -1, 2).astype(jnp.float32)
    bias = jnp.zeros((cfg.num_experts,), jnp.float32)
    _check(cfg, logits, bias, jax.random.normal(jax.random.key(1), (37, cfg.top_k), jnp.float32))


def test_router_counts_invariants():
    cfg = CONFIGS[2]
    logits = jax.random.normal(jax.random.key(3), (37, cfg.num_experts), jnp.float32)
    ids, gates, counts = route(logits, jnp.zeros(cfg.num_experts), cfg, block_sizes=BlockSizes(16))
    flat = np.asarray(ids).reshape(-1)
    assert int(counts.sum()) == 37 * cfg.top_k
    np.testing.assert_array_equal(np.bincount(flat, minlength=cfg.num_experts), counts)
    # group limit: each token's experts lie in at most topk_group groups
    groups = flat.reshape(37, cfg.top_k) // (cfg.num_experts // cfg.n_group)
    assert max(len(set(row)) for row in groups) <= cfg.topk_group
    np.testing.assert_allclose(np.asarray(gates).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
