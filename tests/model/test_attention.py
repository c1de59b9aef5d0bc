"""Every attention backend that runs on CPU against the naive reference, forward and gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model.attention import attention, naive_attention, resolve_impl, splash_attention
from model.config import YarnConfig
from model.flash_attention import flash_attention
from tests.tolerances import assert_close
from tests.util import tiny_config


def _segments(b: int, t: int) -> jnp.ndarray:
    """Row 0: three packed documents then padding (segment 0); row 1: one document; the last row
    (when b > 2): padding only."""
    seg = np.ones((b, t), np.int32)
    seg[0, t // 4 : t // 2] = 2
    seg[0, t // 2 : t - 3] = 3
    seg[0, t - 3 :] = 0
    if b > 2:
        seg[-1] = 0
    return jnp.asarray(seg)


def _inputs(b, h, t, dk, dv, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, h, t, dk)),
        jax.random.normal(kk, (b, h, t, dk)),
        jax.random.normal(kv, (b, h, t, dv)),
    )


def _check_against_naive(fn, q, k, v, seg, scale):
    assert_close(fn(q, k, v, seg, scale=scale), naive_attention(q, k, v, seg, scale=scale), composite=True)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, seg, scale=scale)))
    g_fast = jax.grad(loss(fn), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(naive_attention), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert_close(a, b, composite=True, err_msg=f"d{name}")


# YaRN (DeepSeek-V3's s=40) multiplies the softmax scale by mscale^2 ~ 1.87: sharper softmax rows.
_YARN_SCALE = tiny_config(yarn=YarnConfig(factor=40.0, mscale=1.0, mscale_all_dim=1.0)).softmax_scale


@pytest.mark.parametrize(
    "b, h, t, dk, dv, block, scale",
    [
        (3, 2, 37, 12, 8, 16, 12**-0.5),  # t not a multiple of the block; a padding-only row
        (2, 3, 64, 12, 8, 16, 12**-0.5),  # t a multiple of the block, 4 x 4 tiles
        (2, 2, 50, 24, 16, 64, _YARN_SCALE),  # one block larger than t (capped); YaRN scale
        (3, 1, 45, 8, 8, 8, _YARN_SCALE),  # equal head dims, many small blocks
    ],
)
def test_blockwise_matches_naive(b, h, t, dk, dv, block, scale):
    q, k, v = _inputs(b, h, t, dk, dv)
    fn = lambda q, k, v, seg, scale: flash_attention(q, k, v, seg, scale=scale, block=block)
    _check_against_naive(fn, q, k, v, _segments(b, t), scale)


def test_splash_interpreted_matches_naive():
    """JAX's TPU splash kernel, run by the Pallas interpreter on CPU (MLA head dims: v < q/k)."""
    q, k, v = _inputs(3, 2, 128, 24, 16, seed=1)
    fn = lambda q, k, v, seg, scale: splash_attention(q, k, v, seg, scale=scale, interpret=True)
    _check_against_naive(fn, q, k, v, _segments(3, 128), _YARN_SCALE)


def test_splash_on_a_mesh_runs_per_device_and_matches_naive():
    """On a mesh the kernel runs under shard_map with the layout the model passes explicitly (rows
    over the batch axes, heads over the tensor axis: train/sharding.RULES), and gives the
    one-device result, forward and gradients."""
    from train.sharding import expert_parallel, make_mesh

    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, expert=2, tensor=2)))
    ep = expert_parallel(mesh)
    assert ep.heads == ("tensor",) and "data" in ep.batch
    q, k, v = _inputs(4, 2, 128, 24, 16, seed=2)
    fn = lambda q, k, v, seg, scale: splash_attention(q, k, v, seg, scale=scale, interpret=True, ep=ep)
    _check_against_naive(fn, q, k, v, _segments(4, 128), _YARN_SCALE)


def test_blockwise_saves_no_score_matrix():
    """The gradient program of the blockwise path has no [t, t] array; the naive one does (so the
    check can fail): what makes its memory linear in t."""
    t = 96
    q, k, v = _inputs(1, 2, t, 8, 8)
    seg = jnp.ones((1, t), jnp.int32)

    def program(f):
        return str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(f(q, k, v, seg, scale=0.3))))(q))

    assert f"{t},{t}]" in program(naive_attention)
    assert f"{t},{t}]" not in program(lambda *a, **kw: flash_attention(*a, **kw, block=32))


def test_resolve_impl():
    kw = {"seq_len": 1024, "dtype": jnp.bfloat16, "qk_head_dim": 192}
    assert resolve_impl("auto", backend="cpu", **{**kw, "seq_len": 128}) == "naive"
    assert resolve_impl("auto", backend="cpu", **kw) == "xla"
    assert resolve_impl("auto", backend="tpu", **kw) == "splash"
    assert resolve_impl("auto", backend="tpu", **{**kw, "seq_len": 1000}) == "xla"  # splash blocks: 128
    assert resolve_impl("auto", backend="gpu", device_kind="NVIDIA H100 80GB HBM3", **kw) == "cudnn"
    assert resolve_impl("auto", backend="gpu", device_kind="NVIDIA A100-SXM4-80GB", **kw) == "xla"  # 192 > 128
    assert resolve_impl("auto", backend="gpu", device_kind="NVIDIA H100", **{**kw, "dtype": jnp.float32}) == "xla"
    assert resolve_impl("naive", backend="tpu", **kw) == "naive"
    with pytest.raises(ValueError, match="one of"):
        resolve_impl("flash", backend="cpu", **kw)
    with pytest.raises(ValueError, match="cudnn"):
        resolve_impl("cudnn", backend="gpu", **{**kw, "dtype": jnp.float32})
    with pytest.raises(ValueError, match="multiple of 128"):
        resolve_impl("splash", backend="tpu", **{**kw, "seq_len": 1000})


def test_entry_point_dispatches():
    """``attention(impl=...)`` runs the chosen backend (on CPU: naive and xla agree)."""
    q, k, v = _inputs(2, 2, 300, 8, 8)
    seg = _segments(2, 300)
    ref = attention(q, k, v, seg, scale=0.3, impl="naive")
    assert_close(attention(q, k, v, seg, scale=0.3, impl="xla"), ref, composite=True)
    assert_close(attention(q, k, v, seg, scale=0.3, impl="auto"), ref, composite=True)  # 300 > SHORT_SEQ: xla
