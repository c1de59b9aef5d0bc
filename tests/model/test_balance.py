"""Load balancing: the aux-loss-free bias rule and the sequence-wise loss (DeepSeek-V3 Sec. 2.1.2),
the classic batch-wise auxiliary loss (DeepSeek-V2 eq. 23-25)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.balance import (
    batch_balance_loss,
    batch_balance_terms,
    load_shape,
    max_violation,
    routers,
    sequence_balance_loss,
    update_router_biases,
)
from model.moe import MoE
from model.transformer import Transformer
from tests.util import tiny_config


def test_bias_update_direction_and_size():
    cfg = tiny_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rs = routers(model)
    assert len(rs) == cfg.n_moe_layers + cfg.mtp_depth
    load = jnp.array([10.0, 0, 5, 5, 5, 5, 5, 5])  # mean 5
    update_router_biases(model, jnp.stack([load] * len(rs)), gamma=0.01)
    for r in rs:
        np.testing.assert_allclose(np.asarray(r.bias[...]), [-0.01, 0.01, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(max_violation(load[None])), [1.0])


def test_bias_update_balances_a_skewed_router():
    """Repeated updates drive a router with a strongly preferred expert towards balance."""
    cfg = tiny_config(n_group=1, topk_group=1, n_routed_experts=8, n_experts_per_tok=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    r = routers(model)[0]
    r.weight[...] = r.weight[...].at[:, 0].add(3.0)  # expert 0 wins for most tokens
    x = jax.random.normal(jax.random.key(0), (512, cfg.d_model))
    valid = jnp.ones((512,), bool)
    first = None
    n = len(routers(model))
    for _ in range(300):
        load = r(x, valid).load  # [e]
        vio = float(max_violation(load[None])[0])
        first = vio if first is None else first
        update_router_biases(model, jnp.zeros((n, cfg.n_routed_experts)).at[0].set(load), gamma=0.01)
    assert vio < 0.5 * first


def test_sequence_balance_loss_formula():
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 7, 6, 2
    scores = rng.uniform(0.05, 1, size=(b, t, e)).astype(np.float32)
    ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) for _ in range(b)]).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[1, 5:] = False
    valid[2, :] = False  # an all-padding row is ignored
    total, rows = 0.0, 0
    for i in range(b):
        T = valid[i].sum()
        if T == 0:
            continue
        f = np.zeros(e)
        P = np.zeros(e)
        for tt in range(t):
            if not valid[i, tt]:
                continue
            for j in ids[i, tt]:
                f[j] += e / (k * T)
            P += scores[i, tt] / scores[i, tt].sum() / T
        total += (f * P).sum()
        rows += 1
    got = sequence_balance_loss(jnp.asarray(ids), jnp.asarray(scores), jnp.asarray(valid), e)
    np.testing.assert_allclose(float(got), total / rows, rtol=1e-5)


def test_batch_balance_loss_formula():
    """sum_i f_i P_i over all valid tokens of the batch at once, f_i = N/(K T) load_i,
    P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t} (plain loops; padding ignored)."""
    rng = np.random.default_rng(1)
    m, e, k = 23, 6, 2
    scores = rng.uniform(0.05, 1, size=(m, e)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
    valid = rng.uniform(size=m) < 0.7
    T = valid.sum()
    load, P = np.zeros(e), np.zeros(e)
    for t in range(m):
        if valid[t]:
            load[ids[t]] += 1
            P += scores[t] / scores[t].sum() / T
    want = float((e / (k * T) * load * P).sum())
    got = batch_balance_loss(jnp.asarray(load), *batch_balance_terms(jnp.asarray(scores), jnp.asarray(valid)), k)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_moe_batch_balance_loss_is_the_sequence_loss_of_the_whole_batch():
    """The MoE layer's ``batch_balance_loss`` = the sequence-wise loss of its batch as one row (the
    other code path), and differs from the per-row mean (so the two are not the same switch)."""
    cfg = tiny_config(n_group=1, topk_group=1)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, cfg.d_model))
    seg = jnp.ones((3, 8), jnp.int32).at[1, 5:].set(0)
    _, aux = moe(x, seg)
    r = moe.router(x.reshape(-1, cfg.d_model), (seg != 0).reshape(-1))
    k, e = cfg.n_experts_per_tok, cfg.n_routed_experts
    one_row = sequence_balance_loss(r.ids.reshape(1, -1, k), r.scores.reshape(1, -1, e), (seg != 0).reshape(1, -1), e)
    np.testing.assert_allclose(float(aux["batch_balance_loss"]), float(one_row), rtol=1e-5)
    assert abs(float(aux["batch_balance_loss"]) - float(aux["balance_loss"])) > 1e-4


@pytest.mark.parametrize("scan", [False, True])
def test_forward_returns_each_routers_load_in_update_order(scan):
    """aux["expert_load"] has one row per MoE layer (+ MTP) in ``routers`` order, counting the valid
    tokens' assignments: biasing one layer's router to expert 0 shows up in that row only."""
    cfg = tiny_config(scan_layers=scan, n_group=1, topk_group=1)  # 2 MoE layers + MTP
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    layer = 1  # the second MoE layer
    r = routers(model)[0 if scan else layer]
    bias = r.bias[...]  # [l, e] scanned, else [e]
    r.bias[...] = bias.at[layer, 0].set(100.0) if scan else bias.at[0].set(100.0)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    seg = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    loads = np.asarray(nnx.jit(lambda m, i, s: m(i, None, s).aux["expert_load"])(model, ids, seg))
    assert loads.shape == load_shape(model) == (cfg.n_moe_layers + cfg.mtp_depth, cfg.n_routed_experts)
    np.testing.assert_array_equal(loads.sum(-1), 15 * cfg.n_experts_per_tok)
    np.testing.assert_array_equal(loads[:, 0] == 15, np.arange(len(loads)) == layer)
