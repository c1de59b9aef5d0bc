"""latentmoe model: DeepSeek-V3-style decoder in Flax NNX.

Letter glossary used in every einsum and shape comment of this package:

  b batch            t query position      s key position      d model width (hidden)
  h attention heads  c KV latent (kv_lora_rank)                q query latent (q_lora_rank)
  n content (no-rope) head dim           r rope head dim       v value head dim
  e routed experts   k top-k slot          g expert group      f FFN hidden width
  m rows of a sorted (token, slot) list    V vocabulary        l layers
  j KV heads of GQA (n_kv_heads)   p query heads per KV head (h = j p)
  in attention einsums (attention.py, gqa.py) k / v are the query-key / value head dims

Files (one concept each): config.py (ModelConfig), norms.py, rope.py (RoPE + YaRN / Llama-3.1
scaling), mla.py (Multi-head Latent Attention), gqa.py (grouped-query attention: Llama, Qwen),
ffn.py (SwiGLU), router.py (DeepSeekMoE gate), grouped_matmul.py (activated-FLOPs expert matmul),
dispatch.py (sort assignments into expert buffers and back), moe.py (the MoE pipeline: routed +
shared experts), balance.py (aux-free bias update, sequence-wise loss), block.py (one transformer
block), mtp.py (multi-token prediction), transformer.py (the whole model), loss.py, presets.py
(named sizes), moe_reference.py (dense reference used by the tests), hf_config.py / hf.py (Hugging
Face configs and weights), decode.py (latent KV cache, cached forward, reference generation loop),
decode_experts.py (routed experts of a decode step), sampling.py, generation.py (the compiled
generation loop), speculative.py (MTP speculative decoding), moe_ep.py (expert parallelism),
param_count.py.
"""

from model.config import Llama3RopeConfig, ModelConfig, YarnConfig  # noqa: F401
