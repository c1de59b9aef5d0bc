"""Causal self-attention with packed-segment masking: one entry point, several backends.

    o = softmax(q k^T * scale + mask) v,  mask = causal AND same segment  (segment 0 = padding,
                                                                            which sees only padding)

``attention(q, k, v, segment_ids, scale=..., impl=...)`` takes q [b, h, t, k], k [b, h, t, k],
v [b, h, t, v] (the value head dim may differ from the query/key one, as in MLA: k = n + r) and
returns o [b, h, t, v]. Backends (``ModelConfig.attention_impl``; ``resolve_impl`` is the only
place "auto" is decided):

  naive   the textbook formula: the full f32 score and probability tensors [b, h, t, t], kept
          for the backward. The reference every other backend is tested against.
  xla     blockwise online-softmax attention with a recomputing backward
          (``model/flash_attention.py``, FlashAttention-2): memory linear in t, any backend.
  splash  JAX's shipped TPU kernel (``jax.experimental.pallas.ops.tpu.splash_attention``, causal
          mask + segment ids, block-sparse, so fully masked blocks are skipped); TPU only (the
          tests run it through the Pallas interpreter on CPU). Needs t a multiple of 128.
  cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention) on
          NVIDIA GPUs; bf16/fp16 only and k <= 128 (<= 256 on Hopper and later), multiple of 8.
  auto    TPU: splash when t % 128 == 0; GPU: cudnn where its limits allow; CPU: naive up to
          ``SHORT_SEQ`` tokens (the [t, t] tensors are small and one fused softmax is fastest),
          else xla; xla wherever the preferred kernel does not fit.

jax.nn.dot_product_attention wants the value head dim equal to the key one, so for cudnn v is
zero-padded from v to k and the extra output columns (exactly zero) are dropped; the packed-
document mask goes in as a boolean [b, 1, t, s] (cuDNN turns it into a bias: quadratic in t per
row, but not per head and not f32). Splash (jax 0.10) takes different q/k and v head dims as
they are (compiled for TPU v5p with MLA's 192 / 128 in tests/kernels_pallas/test_tpu_compile.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.flash_attention import flash_attention

IMPLS = ("auto", "naive", "xla", "splash", "cudnn")
SHORT_SEQ = 256  # CPU: up to here the naive path is as fast and its [t, t] tensors are small
SPLASH_BLOCK = 128


def _cudnn_head_dim_limit(device_kind: str) -> int:
    """cuDNN flash attention's largest head dim: 256 from Hopper (sm90) on, else 128."""
    hopper_or_later = any(s in device_kind for s in ("H100", "H200", "H800", "GH200", "B100", "B200", "GB200"))
    return 256 if hopper_or_later else 128


def resolve_impl(impl: str, *, backend: str, seq_len: int, dtype, qk_head_dim: int, device_kind: str = "") -> str:
    """The backend that runs for ``impl`` (one of ``IMPLS``) on ``backend`` (cpu | gpu | tpu).

    An explicit choice is checked against the kernel's shape limits, not against ``backend``: a
    program may be lowered for a TPU on a CPU host (``tools/plan.py --topology``).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    cudnn_ok = (
        jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and qk_head_dim % 8 == 0
        and qk_head_dim <= _cudnn_head_dim_limit(device_kind)
    )
    if impl == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"attention impl 'cudnn' needs bf16/fp16 and a head dim that is a multiple of 8 within "
            f"cuDNN's limit on {device_kind or backend}; got {jnp.dtype(dtype).name}, {qk_head_dim}"
        )
    if impl == "splash" and seq_len % SPLASH_BLOCK:
        raise ValueError(f"attention impl 'splash' needs seq_len a multiple of {SPLASH_BLOCK}, got {seq_len}")
    if impl != "auto":
        return impl
    if backend == "tpu":
        return "splash" if seq_len % SPLASH_BLOCK == 0 else "xla"
    if backend == "gpu":
        return "cudnn" if cudnn_ok else "xla"
    return "naive" if seq_len <= SHORT_SEQ else "xla"


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean [b, 1, t, s]: causal and same-segment (packed documents never see each other)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, t, s]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [t, s]
    return (same & causal[None])[:, None]


def naive_attention(q, k, v, segment_ids, *, scale: float) -> jax.Array:
    """The reference: full f32 scores [b, h, t, s] (what MLA did before the backend switch)."""
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32) * scale  # [b, h, t, s]
    bias = jnp.where(attention_mask(segment_ids), 0.0, -1e30)  # [b, 1, t, s]
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)  # [b, h, t, s]
    return jnp.einsum("bhts,bhsv->bhtv", probs, v)  # [b, h, t, v]


def splash_attention(q, k, v, segment_ids, *, scale: float, interpret: bool = False, ep=None) -> jax.Array:
    """JAX's TPU splash kernel, vmapped over the batch (it takes one sequence: [h, t, k]).

    A Pallas call has no partitioning rule, so on a mesh XLA would gather every input onto every
    device; with ``ep`` (the model's ``shard_map`` layout, ``model/moe_ep.ExpertParallel``: its mesh
    and the mesh axes of the batch rows and of the heads, from ``train/sharding.RULES``) the kernel
    runs under ``shard_map`` instead, on each device's rows and heads, as the arrays are laid out."""
    if ep is None:
        return _splash(q, k, v, segment_ids, scale=scale, interpret=interpret)
    spec, seg_spec = P(ep.batch, ep.heads), P(ep.batch)
    fn = functools.partial(_splash, scale=scale, interpret=interpret)
    return jax.shard_map(fn, mesh=ep.mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids
    )


def _splash(q, k, v, segment_ids, *, scale: float, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as sk

    h, t = q.shape[1], q.shape[2]
    mask = sk.MultiHeadMask([sk.CausalMask((t, t)) for _ in range(h)])
    blocks = min(512, t)
    blocks = blocks if t % blocks == 0 else SPLASH_BLOCK
    sizes = sk.BlockSizes(
        block_q=blocks,
        block_kv=blocks,
        block_kv_compute=blocks,
        block_q_dkv=blocks,
        block_kv_dkv=blocks,
        block_kv_dkv_compute=blocks,
        block_q_dq=blocks,
        block_kv_dq=blocks,
    )
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    seg = segment_ids.astype(jnp.int32)

    def one(q1, k1, v1, s1):  # [h, t, k], [h, t, k], [h, t, v], [t]
        return kernel(q1 * jnp.asarray(scale, q1.dtype), k1, v1, sk.SegmentIds(q=s1, kv=s1))

    return jax.vmap(one)(q, k, v, seg)  # [b, h, t, v]


def cudnn_attention(q, k, v, segment_ids, *, scale: float) -> jax.Array:
    """cuDNN flash attention; v is padded to k's head dim (the API needs them equal)."""
    dk, dv = q.shape[-1], v.shape[-1]
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dk - dv))) if dv < dk else v
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [b, 1, t, s]: packed documents
    bthk = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [b, h, t, k] <-> [b, t, h, k]
    o = jax.nn.dot_product_attention(
        bthk(q), bthk(k), bthk(v_pad), mask=same, scale=scale, is_causal=True, implementation="cudnn"
    )  # [b, t, h, k]
    return bthk(o)[..., :dv]


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float, impl: str = "auto", ep=None
) -> jax.Array:
    """q [b, h, t, k], k [b, h, t, k], v [b, h, t, v], segment_ids [b, t] -> [b, h, t, v]. ``ep``: the
    model's ``shard_map`` layout on a mesh (only the splash kernel needs it; None on one device)."""
    impl = resolve_impl(
        impl,
        backend=jax.default_backend(),
        seq_len=q.shape[2],
        dtype=q.dtype,
        qk_head_dim=q.shape[-1],
        device_kind=jax.devices()[0].device_kind,
    )
    if impl == "naive":
        return naive_attention(q, k, v, segment_ids, scale=scale)
    if impl == "xla":
        block = 128 if jax.default_backend() == "cpu" else 512  # CPU: fastest of 64..512 measured
        return flash_attention(q, k, v, segment_ids, scale=scale, block=block)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, scale=scale, ep=ep)  # compiled by Mosaic: TPU only
    return cudnn_attention(q, k, v, segment_ids, scale=scale)
