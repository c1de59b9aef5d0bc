"""Router against a per-token Python loop (DeepSeek-V3 report Sec. 2.1.2, eq. 13-16)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.router import route
from tests.util import tiny_config


def loop_route(logits, bias, cfg):
    out_ids, out_gates = [], []
    e, k = cfg.n_routed_experts, cfg.n_experts_per_tok
    per = e // cfg.n_group
    for row in np.asarray(logits, np.float64):
        if cfg.score_fn == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        choice = [s[i] + (bias[i] if cfg.use_aux_free_bias else 0.0) for i in range(e)]
        allowed = set(range(e))
        if cfg.n_group > 1:
            top = [sorted(choice[g * per : (g + 1) * per], reverse=True) for g in range(cfg.n_group)]
            # V3 (noaux_tc): sum of the top-2 biased scores; V2 (group_limited_greedy): the max
            gscore = [sum(t[:2]) if cfg.group_score == "top2_sum" else t[0] for t in top]
            keep = sorted(range(cfg.n_group), key=lambda g: (-gscore[g], g))[: cfg.topk_group]
            allowed = {i for g in keep for i in range(g * per, (g + 1) * per)}
        ids = sorted(allowed, key=lambda i: (-choice[i], i))[:k]
        gates = [s[i] for i in ids]
        if cfg.norm_topk_prob:
            tot = sum(gates)
            gates = [g / tot for g in gates]
        out_ids.append(ids)
        out_gates.append([g * cfg.routed_scaling_factor for g in gates])
    return np.array(out_ids), np.array(out_gates)


ROUTES = [
    dict(score_fn="sigmoid", n_group=4, topk_group=2),
    dict(score_fn="sigmoid", n_group=1, topk_group=1, norm_topk_prob=False),
    dict(score_fn="softmax", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(score_fn="softmax", n_group=2, topk_group=1),
    dict(score_fn="sigmoid", n_group=4, topk_group=2, use_aux_free_bias=False),
    dict(
        score_fn="softmax", n_group=4, topk_group=2, group_score="max", use_aux_free_bias=False, norm_topk_prob=False
    ),  # DeepSeek-V2 group_limited_greedy
    dict(score_fn="sigmoid", n_group=4, topk_group=2, group_score="max"),
    dict(score_fn="softmax", n_group=16, topk_group=3, group_score="max"),  # one expert per group
]


# Every routing rule on the jnp path; the Pallas router (interpreted: slower) on one V3 and one V2 rule.
@pytest.mark.parametrize("kw, impl", [(kw, "scan") for kw in ROUTES] + [(ROUTES[0], "pallas"), (ROUTES[5], "pallas")])
def test_route_matches_loop(kw, impl):
    cfg = tiny_config(n_routed_experts=16, n_experts_per_tok=3, kernels_impl=impl, **kw)
    logits = jax.random.normal(jax.random.key(0), (40, 16)) * 2
    bias = np.asarray(jax.random.normal(jax.random.key(1), (16,)) * 0.3)
    r = route(logits, jnp.asarray(bias, jnp.float32), cfg)
    ids, gates = loop_route(logits, bias, cfg)
    if cfg.group_score == "max" and cfg.n_group < 16:  # here the V3 group score picks other experts
        other = cfg.replace(group_score="top2_sum")
        assert (np.sort(loop_route(logits, bias, other)[0], -1) != np.sort(ids, -1)).any()
    # the same set of experts (order among equal-choice ties is irrelevant to the output)
    np.testing.assert_array_equal(np.sort(np.asarray(r.ids), -1), np.sort(ids, -1))
    order_f, order_l = np.argsort(np.asarray(r.ids), -1), np.argsort(ids, -1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(r.gates), order_f, -1),
        np.take_along_axis(gates, order_l, -1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bias_changes_selection_not_gates():
    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, n_experts_per_tok=2)
    logits = jnp.zeros((1, 8)).at[0, :2].set(1.0)
    bias = jnp.zeros(8).at[5].set(10.0)
    r = route(logits, bias, cfg)
    assert 5 in np.asarray(r.ids)[0]
    s = jax.nn.sigmoid(logits)[0]
    chosen = np.asarray(r.ids)[0]
    expect = np.asarray(s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor)
    np.testing.assert_allclose(np.asarray(r.gates)[0], expect, rtol=1e-6)


@pytest.mark.parametrize("impl", ["scan", "pallas"])
def test_router_load_counts_valid_tokens_and_scores(impl):
    """Router outputs the model uses besides ids/gates: the load of the valid tokens only (padding
    routed but not counted) and the scores for the balance loss, equal on both backends."""
    cfg = tiny_config(kernels_impl=impl)
    logits = jax.random.normal(jax.random.key(2), (21, cfg.n_routed_experts))
    valid = jnp.arange(21) % 4 != 1
    r = route(logits, jnp.zeros(cfg.n_routed_experts), cfg, valid)
    want = np.bincount(np.asarray(r.ids)[np.asarray(valid)].reshape(-1), minlength=cfg.n_routed_experts)
    np.testing.assert_array_equal(np.asarray(r.load), want)
    np.testing.assert_allclose(np.asarray(r.scores), np.asarray(jax.nn.sigmoid(logits)), rtol=1e-6)


def test_gate_gradient_flows_to_logits_not_bias():
    cfg = tiny_config()
    logits = jax.random.normal(jax.random.key(0), (6, cfg.n_routed_experts))
    g_logits, g_bias = jax.grad(lambda l, b: route(l, b, cfg).gates.sum() ** 2, argnums=(0, 1))(
        logits, jnp.zeros(cfg.n_routed_experts)
    )
    assert np.abs(np.asarray(g_logits)).sum() > 0
    np.testing.assert_array_equal(np.asarray(g_bias), 0.0)
