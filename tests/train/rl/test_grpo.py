"""GRPO's math against hand-computed formulas, REINFORCE, and the sampler's own log-probs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import generation
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config
from train import sharding
from train.rl import grpo
from train.rl.step import make_logprob_fn


def test_advantages_by_hand_with_a_zero_variance_group():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 0.0, 0.0, 0.0])  # 3 groups of 4
    a = np.asarray(grpo.group_advantages(r, 4, "std", eps=0.0 + 1e-4))
    # group 1: mean 0.5, population std 0.5 -> +-1 (up to eps); group 2: all equal -> 0 exactly.
    np.testing.assert_allclose(a[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(a[4:8], 0.0)
    # group 3: mean 0.75, std sqrt(mean((2.25, -0.75 x3)^2)) = sqrt((5.0625 + 3 * 0.5625) / 4) = 1.299...
    std = np.sqrt((2.25**2 + 3 * 0.75**2) / 4)
    np.testing.assert_allclose(a[8:], np.array([2.25, -0.75, -0.75, -0.75]) / (std + 1e-4), rtol=1e-6)
    # Dr. GRPO: centred only.
    np.testing.assert_allclose(grpo.group_advantages(r, 4, "none")[8:], [2.25, -0.75, -0.75, -0.75], rtol=1e-6)
    assert float(grpo.zero_variance_fraction(r, 4)) == pytest.approx(1 / 3)


@pytest.mark.parametrize("g, msg", [(1, "group_size=1"), (5, "do not split")])
def test_advantages_refuse_bad_group_sizes(g, msg):
    with pytest.raises(ValueError, match=msg):
        grpo.group_advantages(np.zeros(12), g)


def test_clipped_surrogate_on_both_sides_of_the_clip():
    eps = 0.2
    # ratios 1.5 (above 1 + eps), 0.5 (below 1 - eps), 1.1 (inside), each with A = +2 and A = -2.
    ratios = np.array([1.5, 0.5, 1.1])
    logp = np.log(ratios)[None].repeat(2, 0)  # [2, 3]; old_logp = 0
    adv = np.array([2.0, -2.0])
    out = grpo.grpo_loss(logp, np.zeros_like(logp), adv, np.ones_like(logp), eps_low=eps, aggregation="token")
    # A > 0: min(1.5*2, 1.2*2)=2.4 (clipped), min(0.5*2, 0.8*2)=1.0, min(2.2, 2.2)=2.2
    # A < 0: min(-3, -2.4)=-3.0, min(-1, -1.6)=-1.6 (clipped), -2.2
    want = [[2.4, 1.0, 2.2], [-3.0, -1.6, -2.2]]
    assert float(out.loss) == pytest.approx(-np.mean(want), rel=1e-6)
    assert float(out.clip_fraction) == pytest.approx(2 / 6)
    # gradient: zero exactly where the clipped branch was taken, ratio * A / t elsewhere (d ratio / d logp = ratio)
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, jnp.zeros_like(lp), adv, jnp.ones_like(lp), aggregation="token").loss)(
        jnp.asarray(logp)
    )
    want_g = -np.array([[0.0, 0.5 * 2, 1.1 * 2], [1.5 * -2, 0.0, 1.1 * -2]]) / 6
    np.testing.assert_allclose(g, want_g, rtol=1e-6, atol=1e-7)
    # clip-higher: eps_high = 0.6 leaves 1.5 unclipped for A > 0
    hi = grpo.grpo_loss(logp, np.zeros_like(logp), adv, np.ones_like(logp), eps_low=eps, eps_high=0.6)
    assert float(hi.clip_fraction) == pytest.approx(1 / 6)


def test_k3_kl_by_hand():
    logp, ref = np.log(np.array([0.5, 0.2])), np.log(np.array([0.25, 0.2]))
    # d = log(0.25/0.5) = -ln 2: exp(d) - d - 1 = 0.5 + ln 2 - 1; equal probs -> 0
    np.testing.assert_allclose(grpo.k3_kl(logp, ref), [0.5 + np.log(2) - 1, 0.0], atol=1e-7)
    # in the loss: ratio 1 (old = logp), A = 0 -> loss = beta * mean KL
    lp = logp[None]
    out = grpo.grpo_loss(lp, lp, np.zeros(1), np.ones_like(lp), ref_logp=ref[None], beta=0.1, aggregation="token")
    assert float(out.loss) == pytest.approx(0.1 * (0.5 + np.log(2) - 1) / 2, rel=1e-5)
    assert float(out.kl) == pytest.approx((0.5 + np.log(2) - 1) / 2, rel=1e-5)


def test_sequence_vs_token_aggregation():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    m = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(grpo.aggregate(x, m, "sequence")) == pytest.approx((2.5 + 10.0) / 2)
    assert float(grpo.aggregate(x, m, "token")) == pytest.approx(20.0 / 5)
    # a fully masked (truncated) row: adds 0 and changes nothing else
    m2 = m.copy()
    m2[1] = 0
    assert float(grpo.aggregate(x, m2, "sequence")) == pytest.approx(2.5 / 2)
    assert float(grpo.aggregate(x, m2, "token")) == pytest.approx(10.0 / 4)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.aggregate(x, m, "batch")


@pytest.mark.parametrize("scale", ["std", "none"])
def test_mu1_beta0_gradient_is_reinforce_with_group_baseline(scale):
    """mu = 1: old = stop_gradient(current), so rho = 1 and grad -J = -mean_i A_i mean_t grad log pi."""
    rng = np.random.default_rng(0)
    b, t, v, g = 6, 5, 7, 3
    theta = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)  # a free logit per position: the "policy"
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    mask = np.ones((b, t), np.float32)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    rewards = np.array([1.0, 0.0, 0.3, 2.0, 2.0, 2.0])

    def logp_of(th):
        return grpo.token_logprobs(th, targets)[0]

    adv = grpo.group_advantages(rewards, g, scale)

    def loss(th):
        lp = logp_of(th)
        return grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), adv, jnp.asarray(mask), aggregation="sequence").loss

    # independent reference: numpy baseline, plain log-softmax gather, per-sequence mean
    r = rewards.reshape(-1, g)
    a_ref = r - r.mean(1, keepdims=True)
    if scale == "std":
        a_ref = a_ref / (r.std(1, keepdims=True) + 1e-4)
    a_ref = a_ref.reshape(-1)

    def reinforce(th):
        lp = jnp.take_along_axis(th - jax.scipy.special.logsumexp(th, -1, keepdims=True), targets[..., None], -1)[
            ..., 0
        ]
        per_seq = jnp.sum(lp * mask, -1) / mask.sum(-1)
        return -jnp.mean(jnp.asarray(a_ref, jnp.float32) * per_seq)

    assert_close(jax.grad(loss)(theta), jax.grad(reinforce)(theta))
    assert np.abs(np.asarray(jax.grad(reinforce)(theta))).max() > 1e-3  # the check has something to compare


def test_training_forward_logprobs_equal_the_samplers():
    """Temperature 1: the learner's log pi(o_t | prefix) from one full forward equals what the
    cached sampler reported while drawing o_t, to 1e-4."""
    cfg = tiny_config(n_layers=2, mtp_depth=0)  # 1 dense + 1 MoE block: the sampler's paths, compiled quickly
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 4, 4, 4, 8]]
    res = generation.generate_details(model, prompts, max_new_tokens=12, temperature=1.0, seed=5)
    width = max(len(p) + len(c) for p, c in zip(prompts, res.tokens))
    rows = np.zeros((len(prompts), width), np.int32)
    for i, (p, c) in enumerate(zip(prompts, res.tokens)):
        rows[i, : len(p) + len(c)] = p + c
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict.fromkeys(sharding.MESH_AXES, 1)))  # 1 device
    state_sh = sharding.tree_shardings({"params": params, "rest": rest}, mesh)
    lp = make_logprob_fn(graphdef, 1.0, mesh, state_sh)(params, rest, jnp.asarray(rows))  # the trainer's jitted forward
    for i, (p, c) in enumerate(zip(prompts, res.tokens)):
        got = np.asarray(lp[i, len(p) - 1 : len(p) - 1 + len(c)])
        np.testing.assert_allclose(got, res.logprobs[i], atol=1e-4, rtol=0)
    # and at T = 0.7 the learner divides by the same temperature
    res7 = generation.generate_details(model, prompts, max_new_tokens=12, temperature=0.7, seed=1)
    rows7 = np.zeros((len(prompts), 20), np.int32)
    for i, (p, c) in enumerate(zip(prompts, res7.tokens)):
        rows7[i, : len(p) + len(c)] = p + c
    lp7 = make_logprob_fn(graphdef, 0.7, mesh, state_sh)(params, rest, jnp.asarray(rows7))
    for i, (p, c) in enumerate(zip(prompts, res7.tokens)):
        np.testing.assert_allclose(lp7[i, len(p) - 1 : len(p) - 1 + len(c)], res7.logprobs[i], atol=1e-4, rtol=0)


def test_token_logprobs_and_entropy_by_hand():
    p = np.array([0.5, 0.25, 0.25])
    lp, ent = grpo.token_logprobs(np.log(p)[None, None], np.array([[1]]))
    assert float(lp[0, 0]) == pytest.approx(np.log(0.25), rel=1e-6)
    assert float(ent[0, 0]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    q = np.sqrt(p) / np.sqrt(p).sum()  # softmax(log p / 2)
    lp2, _ = grpo.token_logprobs(np.log(p)[None, None], np.array([[0]]), temperature=2.0)
    assert float(lp2[0, 0]) == pytest.approx(np.log(q[0]), rel=1e-6)
