"""Hugging Face configs and attention tensors of grouped-query attention models: transformers'
``LlamaForCausalLM`` (Llama 3 / 3.1), ``Qwen2ForCausalLM`` (Qwen2 / Qwen2.5, QwQ) and
``Qwen3ForCausalLM`` (dense Qwen3: per-head q/k RMSNorm), all dense SwiGLU in every block.

The same contract as ``model/hf_config.py`` (the DeepSeek mapping): config.json <-> ``ModelConfig``
is a rename, and any field we cannot represent exactly (sliding-window layers, an o_proj or MLP
bias, an unknown RoPE type) is an error naming it. ``model/hf.py`` streams the weights; this file
gives it the attention tensors:

  q_proj [h k, d] -> wq [d, h, k]     k_proj / v_proj [j k, d] -> wk / wv [d, j, k]
  o_proj [d, h k] -> wo [h, k, d]     q_proj.bias [h k] -> bq [h, k]    k/v_proj.bias [j k] -> bk / bv [j, k]
  q_norm / k_norm [k] -> q_norm / k_norm (Qwen3)

Their RoPE is the rotate-half layout on the whole head (what ``model/gqa.py`` applies), so no
permutation is needed.
"""

from __future__ import annotations

from typing import Optional

from model.config import Llama3RopeConfig, ModelConfig
from model.hf_config import BOOKKEEPING, _need, _yarn_from_hf, with_execution, yarn_to_hf

# architecture -> (model_type, q/k/v biases, per-head q/k norm): what each transformers class fixes
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
# config.json fields we map, check, or that do not change the forward pass (bookkeeping, training-only).
_KNOWN = BOOKKEEPING | {
    "attention_dropout",
    "pretraining_tp",  # Llama: a slicing of the same matmuls
    "hidden_act",
    "mlp_bias",
    "attention_bias",
    "head_dim",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "rms_norm_eps",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "use_sliding_window",  # Qwen2 / Qwen3: refused when on
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "generation_config",
    "is_decoder",
    "return_dict",
}
_LLAMA3_KEYS = {
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
}


def _rope_from_hf(rope: dict, max_pos: int) -> dict:
    """rope_parameters / rope_scaling -> the ``yarn`` / ``llama3_rope`` fields (at most one set)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        unknown = sorted(set(rope) - _LLAMA3_KEYS - {"rope_theta"})
        _need(not unknown, "rope_scaling", unknown, "unknown llama3 RoPE keys")
        return dict(
            llama3_rope=Llama3RopeConfig(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        )
    _need(kind in ("default", "yarn", None), "rope_scaling.type", kind, "only 'default', 'llama3' and 'yarn' RoPE")
    yarn = _yarn_from_hf(rope, max_pos)
    # transformers' Llama / Qwen scale cos and sin only; a softmax-scale factor (DeepSeek's
    # mscale_all_dim) has no place there.
    _need(
        yarn is None or not yarn.mscale_all_dim, "rope_scaling.mscale_all_dim", rope.get("mscale_all_dim"), "MLA only"
    )
    return dict(yarn=yarn)


def config_from_hf(
    hf: dict, *, dtype: Optional[str] = None, mtp_depth: Optional[int] = None, **overrides
) -> ModelConfig:
    """config.json of a Llama / Qwen2 / Qwen3 model -> ModelConfig (``attention_type="gqa"``, every
    block dense). ``overrides``: execution fields only (``EXEC_FIELDS``)."""
    unknown = sorted(set(hf) - _KNOWN)
    arch = (hf.get("architectures") or [None])[0]
    _need(arch in ARCHITECTURES, "architectures", hf.get("architectures"), f"supported: {list(ARCHITECTURES)}")
    if unknown:
        raise ValueError(f"config.json has unknown field(s) {unknown} for {arch}: refusing to guess what they change")
    _, qkv_bias, qk_norm = ARCHITECTURES[arch]
    g = hf.get
    _need(g("hidden_act", "silu") == "silu", "hidden_act", g("hidden_act"), "the FFN is SwiGLU (silu)")
    _need(not g("mlp_bias", False), "mlp_bias", g("mlp_bias"), "FFNs have no biases")
    _need(
        not g("attention_bias", False),
        "attention_bias",
        g("attention_bias"),
        "no o_proj bias (Qwen2's q/k/v biases are implied)",
    )
    _need(not g("use_sliding_window", False), "use_sliding_window", g("use_sliding_window"), "full attention only")
    layers = set(g("layer_types") or ["full_attention"])
    _need(layers == {"full_attention"}, "layer_types", sorted(layers), "full attention only")
    _need(not (mtp_depth or 0), "mtp_depth", mtp_depth, f"{arch} has no MTP modules")
    rope = dict(g("rope_parameters") or g("rope_scaling") or {})
    theta = rope.get("rope_theta", g("rope_theta", 10000.0))
    d, h = g("hidden_size"), g("num_attention_heads")
    fields = dict(
        attention_type="gqa",
        vocab_size=g("vocab_size"),
        d_model=d,
        n_layers=g("num_hidden_layers"),
        first_k_dense=g("num_hidden_layers"),
        dense_ffn_dim=g("intermediate_size"),
        rms_eps=float(g("rms_norm_eps", 1e-6)),
        max_seq_len=g("max_position_embeddings"),
        n_heads=h,
        n_kv_heads=g("num_key_value_heads") or h,
        head_dim=g("head_dim") or d // h,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        rope_theta=float(theta),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        mtp_depth=0,
        **_rope_from_hf(rope, g("max_position_embeddings")),
    )
    return with_execution(fields, dtype or g("torch_dtype") or g("dtype") or "float32", overrides)


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig (GQA, dense) -> config.json: Qwen2 with q/k/v biases, Qwen3 with q/k norms,
    else Llama."""

    def need(ok: bool, why: str):
        if not ok:
            raise ValueError(f"ModelConfig cannot be exported to transformers: {why}")

    need(cfg.first_k_dense == cfg.n_layers, f"{cfg.n_moe_layers} MoE blocks (dense Llama / Qwen2 / Qwen3 only)")
    need(cfg.mtp_depth == 0, f"mtp_depth={cfg.mtp_depth}: transformers' Llama / Qwen have no MTP modules")
    need(not (cfg.qkv_bias and cfg.qk_norm), "q/k/v biases and q/k norms together (Qwen2 has one, Qwen3 the other)")
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    if arch == "Qwen2ForCausalLM":
        need(cfg.head_dim in (None, cfg.d_model // cfg.n_heads), "Qwen2's head dim is d_model // n_heads")
    out = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch][0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dense_ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.attn_head_dim,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": cfg.param_dtype,
    }
    if arch == "Qwen2ForCausalLM":
        del out["head_dim"]  # Qwen2 derives it
    else:
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.llama3_rope is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **vars(cfg.llama3_rope)}
    if cfg.yarn is not None:
        out["rope_scaling"] = yarn_to_hf(cfg.yarn)
    return out


def attention_tensors(cfg: ModelConfig) -> list[tuple[str, tuple, tuple, bool]]:
    """(transformers name under ``self_attn.``, our path under the block, checkpoint shape, transposed)."""
    d, h, j, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    out = [
        ("q_proj.weight", ("attn", "wq"), (h * k, d), True),
        ("k_proj.weight", ("attn", "wk"), (j * k, d), True),
        ("v_proj.weight", ("attn", "wv"), (j * k, d), True),
        ("o_proj.weight", ("attn", "wo"), (d, h * k), True),
    ]
    if cfg.qkv_bias:
        out += [
            ("q_proj.bias", ("attn", "bq"), (h * k,), False),
            ("k_proj.bias", ("attn", "bk"), (j * k,), False),
            ("v_proj.bias", ("attn", "bv"), (j * k,), False),
        ]
    if cfg.qk_norm:
        out += [("q_norm.weight", ("attn", "q_norm", "scale"), (k,), False)]
        out += [("k_norm.weight", ("attn", "k_norm", "scale"), (k,), False)]
    return out
