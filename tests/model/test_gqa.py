"""Grouped-query attention (model/gqa.py) against a per-head numpy reference; backends forward and
gradients; Llama-3.1 RoPE scaling against Meta's reference loop; the config's GQA fields."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import Llama3RopeConfig, ModelConfig
from model.gqa import GQA
from model.rope import inv_frequencies
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config

H, K = 4, 8  # query heads, head dim


def gqa_config(**kw) -> ModelConfig:
    base = dict(attention_type="gqa", d_model=32, n_heads=H, head_dim=K, n_kv_heads=2, first_k_dense=3, mtp_depth=0)
    return tiny_config(**{**base, **kw})


def _randomise(module, seed):
    """Random values for every parameter (biases and norm scales included, which init to 0 / 1)."""
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape) + (a.ndim == 1), a.dtype), state)
    return nnx.merge(graphdef, state)


def reference(attn: GQA, x, positions, segment_ids):
    """Per query head i with KV head i // p, in float64 numpy: projections (+ bias), per-head RMSNorm of
    q and k, rotate-half RoPE, masked softmax, output projection."""
    cfg = attn.cfg
    g = lambda a: np.asarray(a[...], np.float64)  # noqa: E731
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhk->bthk", x, g(m)) for m in (attn.wq, attn.wk, attn.wv))
    if cfg.qkv_bias:
        q, k, v = q + g(attn.bq), k + g(attn.bk), v + g(attn.bv)
    if cfg.qk_norm:
        rms = lambda a, s: a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.rms_eps) * s  # noqa: E731
        q, k = rms(q, g(attn.q_norm.scale)), rms(k, g(attn.k_norm.scale))
    inv, _ = inv_frequencies(cfg.attn_head_dim, cfg.rope_theta, cfg.yarn, cfg.llama3_rope)
    ang = np.asarray(positions, np.float64)[..., None] * inv  # [b, t, k/2]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None], np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
    half = lambda a: np.concatenate([-a[..., K // 2 :], a[..., : K // 2]], -1)  # noqa: E731
    q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
    p = cfg.n_heads // cfg.kv_heads
    seg = np.asarray(segment_ids)
    t = x.shape[1]
    mask = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((t, t), bool))[None]
    o = np.zeros(q.shape)
    for i in range(cfg.n_heads):
        s = np.einsum("btk,bsk->bts", q[:, :, i], k[:, :, i // p]) / math.sqrt(cfg.attn_head_dim)
        s = np.where(mask, s, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        o[:, :, i] = np.einsum("bts,bsk->btk", prob / prob.sum(-1, keepdims=True), v[:, :, i // p])
    return np.einsum("bthk,hkd->btd", o, g(attn.wo))


def _inputs(b=2, t=10, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, 32), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = jnp.asarray([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3], jnp.int32)  # packed docs, padding
    return x, positions, segment_ids


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_kv_heads=H),  # multi-head
        dict(n_kv_heads=2, qkv_bias=True),  # Qwen2
        dict(n_kv_heads=1, qk_norm=True, llama3_rope=Llama3RopeConfig(original_max_position_embeddings=4)),
    ],
    ids=["mha", "gqa2_bias", "mqa_qknorm_llama3"],
)
def test_matches_per_head_reference(kw):
    cfg = gqa_config(attention_impl="naive", **kw)
    attn = _randomise(GQA(cfg, rngs=nnx.Rngs(0)), 1)
    x, positions, segment_ids = _inputs()
    assert_close(attn(x, positions, segment_ids), reference(attn, x, positions, segment_ids), composite=True)


def test_blockwise_backend_forward_and_gradients_equal_naive():
    """The repeated KV heads through the blockwise XLA backend: same output and parameter gradients."""
    x, positions, segment_ids = _inputs(t=20)
    segment_ids = jnp.ones_like(positions)

    def run(impl):
        attn = _randomise(GQA(gqa_config(attention_impl=impl, n_kv_heads=2, qkv_bias=True), rngs=nnx.Rngs(0)), 2)
        loss = lambda m: jnp.sum(jnp.sin(m(x, positions, segment_ids)))  # noqa: E731
        return loss(attn), nnx.grad(loss)(attn)

    (ref, g_ref), (got, g_got) = run("naive"), run("xla")
    assert_close(got, ref, composite=True)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        assert_close(a, b, composite=True)


def _meta_apply_scaling(freqs, c: Llama3RopeConfig):
    """Meta's llama-models ``apply_scaling`` (Llama 3.1 reference), loop as published."""
    low_wavelen = c.original_max_position_embeddings / c.low_freq_factor
    high_wavelen = c.original_max_position_embeddings / c.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / c.factor)
        else:
            smooth = (c.original_max_position_embeddings / wavelen - c.low_freq_factor) / (
                c.high_freq_factor - c.low_freq_factor
            )
            out.append((1 - smooth) * freq / c.factor + smooth * freq)
    return np.array(out)


def test_llama3_rope_matches_meta_reference():
    c = Llama3RopeConfig()  # Llama 3.1's released values, head dim 128, theta 500000
    plain, _ = inv_frequencies(128, 500000.0, None)
    got, amp = inv_frequencies(128, 500000.0, None, c)
    np.testing.assert_allclose(got, _meta_apply_scaling(plain, c), rtol=1e-12)
    assert amp == 1.0
    assert got[0] == plain[0] and got[-1] == plain[-1] / 8  # highest kept, lowest interpolated
    assert ((got > plain / 8) & (got < plain)).sum() > 0  # some dims in the blended band


def test_dense_gqa_model_runs_tied_and_untied():
    cfg = gqa_config(mtp_depth=1)
    for tied in (False, True):
        m = Transformer(cfg.replace(tie_word_embeddings=tied), rngs=nnx.Rngs(0))
        out = m(jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % cfg.vocab_size)
        assert out.logits.shape == (2, 6, cfg.vocab_size) and out.mtp_logits.shape == (1, 2, 6, cfg.vocab_size)
        assert np.isfinite(np.asarray(out.logits)).all() and out.aux["expert_load"].shape == (0, cfg.n_routed_experts)
        assert hasattr(m, "head") != tied
        if tied:  # the head is the embedding: logits = h E^T
            want = jnp.einsum("btd,vd->btv", out.hidden, m.embed[...])
            assert_close(out.logits, want)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
        (dict(head_dim=7), "head_dim must be a positive even int"),
        (dict(attention_type="mqa"), "attention_type must be one of"),
        (dict(attention_type="mla", n_kv_heads=2), "are GQA fields"),
        (dict(llama3_rope=Llama3RopeConfig(), yarn={"factor": 4.0}), "set at most one"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        gqa_config(**kw)
