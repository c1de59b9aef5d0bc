"""MLA against explicit per-head attention on the decompressed K/V (DeepSeek-V2 Sec. 2.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import YarnConfig
from model.mla import MLA
from model.rope import apply_rope, rope_angles
from tests.tolerances import assert_close
from tests.util import tiny_config


def naive_mla(p, cfg, x, positions, segment_ids):
    """Per-head loops in plain jnp: decompress K/V for every head, then textbook attention."""
    n, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim

    def rms(v, w):
        return v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + cfg.rms_eps) * w

    b, t, _ = x.shape
    if cfg.q_lora_rank is None:
        q_all = x @ p["wq"].reshape(cfg.d_model, -1)
    else:
        q_all = rms(x @ p["wq_a"], p["q_norm"]) @ p["wq_b"].reshape(cfg.q_lora_rank, -1)
    q_all = q_all.reshape(b, t, cfg.n_heads, n + r)
    ckv = x @ p["wkv_a"]
    c = rms(ckv[..., : cfg.kv_lora_rank], p["kv_norm"])
    cos, sin = rope_angles(positions, r, cfg.rope_theta, cfg.yarn)
    k_rope = apply_rope(ckv[..., cfg.kv_lora_rank :], cos, sin, interleave=cfg.rope_interleave)
    out = jnp.zeros((b, t, cfg.d_model))
    for h in range(cfg.n_heads):
        wkv = p["wkv_b"][:, h, :]  # [c, n + v]
        k = jnp.concatenate([c @ wkv[:, :n], k_rope], -1)  # decompressed key [b, s, n + r]
        v = c @ wkv[:, n:]
        q = jnp.concatenate(
            [q_all[:, :, h, :n], apply_rope(q_all[:, :, h, n:], cos, sin, interleave=cfg.rope_interleave)], -1
        )
        s = jnp.einsum("btk,bsk->bts", q, k) * cfg.softmax_scale
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
            jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
        )
        s = jnp.where(allowed, s, -jnp.inf)
        o = jax.nn.softmax(s, -1) @ v  # [b, t, v]
        out = out + o @ p["wo"][h]
    return out


def _flat(m):
    """{"wq_a": array, "q_norm": scale array, ...}: the first path element names each weight."""
    return {path[0]: leaf[...] for path, leaf in nnx.to_flat_state(nnx.state(m, nnx.Param))}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(q_lora_rank=None),
        dict(rope_interleave=False),
        dict(yarn=YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=0.7, mscale_all_dim=0.9)),
        dict(attention_impl="xla"),
        dict(attention_impl="xla", yarn=YarnConfig(factor=4.0, original_max_position_embeddings=16)),
    ],
)
def test_mla_matches_naive_forward_and_grad(kw):
    cfg = tiny_config(**kw)
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.array([[1] * 10, [1] * 4 + [2] * 5 + [0]])
    p = _flat(mla)
    assert_close(mla(x, pos, seg), naive_mla(p, cfg, x, pos, seg), composite=True)

    g_fast = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x, pos, seg))))(mla, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(naive_mla(p, cfg, x, pos, seg))))(p, x)
    for name, g in _flat_grads(g_fast).items():
        assert_close(g, g_ref[name], composite=True, err_msg=name)


def _flat_grads(g):
    return {path[0]: leaf[...] for path, leaf in nnx.to_flat_state(g)}


def test_segments_never_attend_across_documents():
    """A packed row [doc A | doc B] gives the same outputs as running A and B separately."""
    cfg = tiny_config()
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 12, cfg.d_model))
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    packed = mla(x, pos, seg)
    a = mla(x[:, :5], jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
    b = mla(x[:, 5:], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
    assert_close(packed, jnp.concatenate([a, b], 1), composite=True)
    # and changing doc A does not move doc B's outputs at all
    x2 = x.at[:, :5].set(jax.random.normal(jax.random.key(3), (1, 5, cfg.d_model)))
    np.testing.assert_array_equal(np.asarray(mla(x2, pos, seg)[:, 5:]), np.asarray(packed[:, 5:]))
