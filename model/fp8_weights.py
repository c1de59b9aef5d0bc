"""Linear weights kept in FP8 for inference: DeepSeek's FP8 release used as stored.

DeepSeek-V3's checkpoint (report Sec. 3.3; ``quantization_config.quant_method = "fp8"``) holds each
linear weight as e4m3 values ``q`` [out, in] and one f32 ``weight_scale_inv`` per 128x128 block:
w = q * scale_inv. ``model.hf.from_pretrained(path, keep_fp8=True)`` keeps ``q`` (transposed to our
[in-dims, out-dims] layout, the [K, N] flattening ``model.linear.linear`` reads) and the scales
(transposed: [ceil(K/128), ceil(N/128)]) as a ``model.linear.QuantizedWeight`` inside an
``FP8Param``; the model then runs with ``gemm_recipe="fp8"``, whose ``linear`` quantizes the
activations per 1x128 tile at run time and multiplies them with the stored blocks (the block-scaled
matmul of ``kernels_pallas/fp8``). One byte per weight plus 4 per 16,384: half of bf16.

Which weights are kept (``kept``): every linear weight of the checkpoint. Those read through
``linear`` (MLA's projections, the dense FFN, the shared experts, the MTP ``eh_proj``), and the
routed experts ("mlp.experts.{i}.*", most of a DeepSeek model's bytes), stacked per layer like the
plain import stacks them: q [(L,) E, K, N], scale [(L,) E, ceil(K/128), ceil(N/128)], multiplied by
``model.grouped_matmul.gmm`` (``kernels_pallas.fp8.grouped_prequantized_matmul``; decode steps
too: ``model/decode_experts.py`` sends quantized recipes to the layer). ``decode.absorbed`` folds
wkv_b into the absorbed cache's W_UK / W_UV (as DeepSeek's inference code does, from the
dequantised weight: ``dense``). The tensors the release stores in bf16 (embedding, output head,
router, norms) load as they are. Expert parallelism (``model/moe_ep.py``) refuses kept experts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from model.linear import QuantizedWeight, dequantize

BLOCK = 128  # model.linear's weight block: a checkpoint with another weight_block_size is refused

# Hugging Face tensors read only through ``model.linear.linear`` (name endings); the routed experts
# ("mlp.experts.{i}.*", read by the grouped matmul) are ``_EXPERT``.
_LINEAR = tuple(
    f".{n}.weight"
    for n in (
        "self_attn.q_proj",
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",  # dense FFN
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
        "eh_proj",
    )
)
_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


class FP8Param(nnx.Param):
    """A linear weight kept quantized: ``w[...]`` is its ``QuantizedWeight`` (q e4m3 in the weight's
    shape, scale [(L,) (E,) ceil(K/128), ceil(N/128)] f32), which ``model.linear.linear`` (routed
    experts: ``model.grouped_matmul.gmm``) multiplies."""

    def __getitem__(self, key):
        if key is not ...:
            raise TypeError(f"FP8Param: only w[...] (the QuantizedWeight) can be read, got index {key!r}")
        return self.get_value()


def kept(name: str) -> bool:
    """Is the Hugging Face tensor ``name`` one of those kept in FP8 (when the checkpoint stores it so)?"""
    return name.endswith(_LINEAR) or _EXPERT.search(name) is not None


def block_shape(k: int, n: int) -> tuple[int, int]:
    """Scale shape of a [K, N] weight: one per 128x128 block, partial edge blocks included."""
    return -(-k // BLOCK), -(-n // BLOCK)


def dense(w, n_out: int, dtype) -> jax.Array:
    """A weight as a plain array in ``dtype``: ``w`` itself, or a ``QuantizedWeight`` dequantised
    (``n_out``: its trailing output axes) for the consumers that fold it into other products."""
    if isinstance(w, QuantizedWeight):
        return dequantize(w, n_out, dtype)
    return w.astype(dtype)


def nbytes(model) -> dict:
    """Bytes of the weights kept in FP8 (q and scales) and of the same weights in bf16 (2 per entry of
    q); not counted: the tensors stored in high precision (embedding, head, router, norms)."""
    kept_bytes = bf16_bytes = 0
    for _, var in nnx.to_flat_state(nnx.state(model, FP8Param)):
        w = var.get_value()
        kept_bytes += w.q.nbytes + w.scale.nbytes
        bf16_bytes += w.q.size * jnp.dtype(jnp.bfloat16).itemsize
    return dict(fp8=kept_bytes, bf16=bf16_bytes)
