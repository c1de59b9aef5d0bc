"""Training FLOPs per token: the numerator of MFU (the peak it divides by: ``train/peak.py``).

MFU = model_flops_per_token * tokens_per_sec / (peak_flops_per_device * n_devices).

FLOPs per trained token (forward + backward; Kaplan et al. 2020 "6N", PaLM App. B for attention):

    6 * N_active  +  6 * L_attn * T * h * (d_qk + d_v) / 2     (the "/2" only for causal masks)

N_active counts the weights one token multiplies with (norms and the embedding lookup are
free; the output head is not). With d = d_model, h = n_heads, V = vocab, E = n_routed_experts,
K = n_experts_per_tok, S = n_shared_experts, f = dense_ffn_dim, f_e = moe_ffn_dim,
q = q_lora_rank, c = kv_lora_rank, d_qk = nope + rope, per block:

    MLA (DeepSeek-V2 Sec. 2.1):   q:   d*q + q*h*d_qk           (d*h*d_qk when q is None)
                                  kv:  d*(c + rope) + c*h*(nope + v_head_dim)
                                  out: h*v_head_dim*d
    GQA (attention_type "gqa"):   q + out: 2*d*h*k,  k and v: 2*d*j*k   (k = head dim, j = KV heads)
    dense SwiGLU:                 3*d*f                       (first_k_dense blocks)
    DeepSeekMoE (V3 Sec. 2.1.2):  d*E + (S + K) * 3*d*f_e     (router + activated experts)
                                  + d with Qwen2-MoE's shared_expert_gate
    output head:                  d*V
    MTP module (V3 Sec. 2.2):     2d*d + MLA + MoE + d*V      per depth (the head is shared but
                                  runs once more per depth); counted when include_mtp.

The attention term is the score (QK^T) and mix (AV) matmuls (GQA: d_qk = d_v = k), T = training sequence length,
L_attn = n_layers (+ mtp_depth with include_mtp). Score matmuls are counted at full width, i.e.
the MLA "absorbed" inference path is not assumed.
"""

from __future__ import annotations


def activated_params(cfg, *, include_mtp: bool = True) -> dict:
    """Weights multiplied per token, by component (see the module docstring)."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + h * cfg.v_head_dim * d
    if cfg.attention_type == "gqa":
        attn = 2 * d * (h + cfg.kv_heads) * cfg.attn_head_dim
    dense = 3 * d * cfg.dense_ffn_dim
    moe = d * cfg.n_routed_experts + (cfg.n_shared_experts + cfg.n_experts_per_tok) * 3 * d * cfg.moe_ffn_dim
    moe += d * cfg.shared_expert_gate
    head = d * cfg.vocab_size
    out = {
        "attention": cfg.n_layers * attn,
        "dense_ffn": cfg.first_k_dense * dense,
        "moe_ffn": cfg.n_moe_layers * moe,
        "head": head,
        "mtp": 0,
    }
    if include_mtp:
        out["mtp"] = cfg.mtp_depth * (2 * d * d + attn + moe + head)
    out["total"] = sum(out.values())
    return out


def model_flops_per_token(cfg, seq_len: int, *, include_mtp: bool = True, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``."""
    n_active = activated_params(cfg, include_mtp=include_mtp)["total"]
    n_attn_layers = cfg.n_layers + (cfg.mtp_depth if include_mtp else 0)
    qk_v = 2 * cfg.attn_head_dim if cfg.attention_type == "gqa" else cfg.qk_head_dim + cfg.v_head_dim
    attn = 6 * n_attn_layers * seq_len * cfg.n_heads * qk_v
    return float(6 * n_active + (attn / 2 if causal else attn))
