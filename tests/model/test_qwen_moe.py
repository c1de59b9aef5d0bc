"""The Qwen-MoE feed-forward layer (softmax router over all experts, plain top-k, normalised or
not, no shared expert or a sigmoid-gated one) against a plain reference written from transformers'
``Qwen2MoeTopKRouter`` / ``Qwen2MoeSparseMoeBlock`` equations:

  p = softmax_f32(x W_r^T); (w, ids) = topk(p, k); w /= sum(w) if norm_topk_prob
  y = sum_j w_j Expert_{ids_j}(x) [+ sigmoid(x W_g^T) SharedExpert(x)]
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.moe import MoE
from model.router import route
from tests.tolerances import assert_close
from tests.util import tiny_config

QWEN = dict(
    score_fn="softmax", n_group=1, topk_group=1, use_aux_free_bias=False, routed_scaling_factor=1.0, n_experts_per_tok=3
)


def qwen_config(**kw):
    return tiny_config(**{**QWEN, **kw})


def hf_qwen_route(logits: np.ndarray, k: int, norm: bool):
    """transformers' Qwen2MoeTopKRouter.forward in numpy (float64): ids [m, k], weights [m, k]."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, -1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    return ids, w


@pytest.mark.parametrize("impl", ["scan", "pallas"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_is_hf_qwen_routing(norm, impl):
    """Selection and gates as HF's: no bias (even a non-zero stored one), no groups, no scaling."""
    cfg = qwen_config(norm_topk_prob=norm, kernels_impl=impl)
    logits = jax.random.normal(jax.random.key(0), (40, cfg.n_routed_experts)) * 2.0
    bias = jax.random.normal(jax.random.key(1), (cfg.n_routed_experts,))  # ignored: use_aux_free_bias=False
    r = route(logits, bias, cfg)
    ids, w = hf_qwen_route(np.asarray(logits), cfg.n_experts_per_tok, norm)
    np.testing.assert_array_equal(np.asarray(r.ids), ids)
    assert_close(r.gates, w.astype(np.float32))
    if not norm:  # unnormalised gates are the softmax probabilities themselves: sum < 1
        assert float(jnp.max(jnp.sum(r.gates, -1))) < 1.0


def plain_qwen_moe(moe: MoE, x: jax.Array) -> jax.Array:
    """HF's Qwen-MoE block from its equations, every expert on every token: x [b, t, d] -> [b, t, d]."""
    cfg = moe.cfg
    e, k = cfg.n_routed_experts, cfg.n_experts_per_tok
    xt = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [m, d]
    p = jax.nn.softmax(xt @ moe.router.weight[...], axis=-1)  # [m, e]
    ids = jnp.argsort(-jax.lax.stop_gradient(p), axis=-1)[:, :k]  # [m, k]
    w = jnp.take_along_axis(p, ids, -1)  # [m, k]
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    combine = jnp.sum(jax.nn.one_hot(ids, e) * w[..., None], axis=1)  # [m, e]
    out = jnp.zeros_like(xt)
    for i in range(e):
        y = (jax.nn.silu(xt @ moe.w_gate[i]) * (xt @ moe.w_up[i])) @ moe.w_down[i]  # [m, d]
        out = out + combine[:, i : i + 1] * y
    if cfg.n_shared_experts:
        s = moe.shared
        y = (jax.nn.silu(xt @ s.w_gate[...]) * (xt @ s.w_up[...])) @ s.w_down[...]  # [m, d]
        out = out + (jax.nn.sigmoid(xt @ moe.shared_gate[...]) * y if cfg.shared_expert_gate else y)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_shared_experts=0, norm_topk_prob=True),  # Qwen3-MoE
        dict(n_shared_experts=2, shared_expert_gate=True, norm_topk_prob=False),  # Qwen2-MoE
    ],
    ids=["qwen3", "qwen2_gated_unnormalised"],
)
def test_qwen_moe_matches_plain_reference_forward_and_grad(kw):
    cfg = qwen_config(**kw)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    if cfg.shared_expert_gate:  # a gate far from 0: sigmoid(.) visibly between 0 and 1 per token
        moe.shared_gate[...] = moe.shared_gate[...] * 3.0
    x = jax.random.normal(jax.random.key(3), (2, 10, cfg.d_model))
    seg = jnp.ones((2, 10), jnp.int32)

    def forward_and_grad(fn):  # jitted: one compile instead of hundreds of eager dispatches
        def loss(m, x):
            y = fn(m, x)
            return jnp.sum(jnp.tanh(y)), y

        return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(moe, x)

    (_, y), (g_moe, g_x) = forward_and_grad(lambda m, x: m(x, seg)[0])
    (_, y_ref), (r_moe, r_x) = forward_and_grad(plain_qwen_moe)
    assert_close(y, y_ref, composite=True)
    assert_close(g_x, r_x, composite=True, err_msg="d input")
    ref = dict(nnx.to_flat_state(nnx.state(r_moe, nnx.Param)))
    paths = []
    for path, g in nnx.to_flat_state(nnx.state(g_moe, nnx.Param)):
        assert_close(g[...], ref[path][...], composite=True, err_msg=str(path))
        paths.append(path[-1])
    assert ("shared_gate" in paths) == cfg.shared_expert_gate


def test_shared_gate_needs_shared_experts():
    with pytest.raises(ValueError, match="shared_expert_gate"):
        qwen_config(n_shared_experts=0, shared_expert_gate=True)


def test_decode_experts_apply_the_shared_gate():
    """Generation's small-batch expert path (model/decode_experts.py) gates the shared expert too."""
    from model.decode_experts import small_batch_moe

    cfg = qwen_config(n_shared_experts=1, shared_expert_gate=True)
    moe = MoE(cfg, rngs=nnx.Rngs(2))
    moe.shared_gate[...] = moe.shared_gate[...] * 3.0
    x = jax.random.normal(jax.random.key(4), (2, 1, cfg.d_model))  # two rows, one new token each
    valid = jnp.ones((2, 1), bool)
    assert_close(small_batch_moe(moe, x, valid), moe(x, valid.astype(jnp.int32))[0], composite=True)
