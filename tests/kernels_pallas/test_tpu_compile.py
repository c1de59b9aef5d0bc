"""Every Pallas kernel compiles for TPU through Mosaic (interpret=False), without a TPU.

``jax.experimental.topologies`` gives TPU devices of a v5p host to lower and compile for with the
real TPU compiler (libtpu). Where libtpu is not installed (the CPU CI venv) these tests are
skipped; run them from a venv with ``pip install "jax[tpu]"``:

  /work/tpuvenv/bin/python -m pytest -q tests/kernels_pallas/test_tpu_compile.py

Each test checks that the compiled program contains the Mosaic kernel (a ``tpu_custom_call``),
i.e. the kernel itself was compiled, not an interpreted or XLA fallback.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_TOPOLOGY = "v5p:2x2x1"


@functools.cache
def _tpu_device():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return None
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY).devices[0]


def _compile_for_tpu(fn, *shapes):
    """Lower ``fn`` for one TPU v5p chip from (shape, dtype) pairs and compile it; the HLO text."""
    device = _tpu_device()
    if device is None:
        pytest.skip("libtpu not installed: TPU compilation needs a venv with jax[tpu]")
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    # A mesh in context tells Pallas which TPU generation it lowers for (else: the host's CPU).
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("x",))):
        text = jax.jit(fn).lower(*args).compile().as_text()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the compiled program"
    return text


def test_gmm_forward_and_gradient():
    from kernels_pallas.gmm import gmm

    def loss(lhs, rhs, sizes):
        return jnp.sum(gmm(lhs, rhs, sizes, impl="pallas", interpret=False).astype(jnp.float32) ** 2)

    _compile_for_tpu(
        jax.grad(loss, (0, 1)), ((512, 256), jnp.bfloat16), ((8, 256, 512), jnp.bfloat16), ((8,), jnp.int32)
    )


def test_router_forward_and_gradient():
    from kernels_pallas.router import RouterConfig, route

    cfg = RouterConfig(num_experts=64, top_k=6, n_group=8, topk_group=3, routed_scaling_factor=2.5)

    def loss(logits, bias):
        return jnp.sum(route(logits, bias, cfg, impl="pallas", interpret=False)[1] ** 2)

    _compile_for_tpu(jax.grad(loss), ((256, 64), jnp.float32), ((64,), jnp.float32))


def test_fp8_quantize_and_matmuls():
    from kernels_pallas.fp8 import ops

    def fn(x, w, sizes):
        kw = dict(impl="pallas", interpret=False)
        y = ops.fp8_matmul(x, w, **kw)  # quantize_activations + quantize_weights + scaled_matmul
        x_q, x_s = ops.quantize_activations(x, **kw)
        ws = jnp.stack([w, w])  # [2, k, n]
        wq, wsc = jax.vmap(lambda a: ops.quantize_weights(a, impl="xla"))(ws)
        return y, ops.grouped_scaled_matmul(x_q, x_s, wq, wsc, sizes, **kw)

    _compile_for_tpu(fn, ((256, 256), jnp.bfloat16), ((256, 256), jnp.bfloat16), ((2,), jnp.int32))


def test_splash_attention_forward_and_gradient():
    from model.attention import splash_attention

    def loss(q, k, v, seg):
        return jnp.sum(splash_attention(q, k, v, seg, scale=0.1).astype(jnp.float32) ** 2)

    # MLA head dims (DeepSeek-V3: q/k 128 + 64, v 128), 2 sequences of 1024 tokens, 4 heads
    _compile_for_tpu(
        jax.grad(loss, (0, 1, 2)),
        ((2, 4, 1024, 192), jnp.bfloat16),
        ((2, 4, 1024, 192), jnp.bfloat16),
        ((2, 4, 1024, 128), jnp.bfloat16),
        ((2, 1024), jnp.int32),
    )
