"""Hugging Face ``config.json`` <-> ``ModelConfig`` (a rename; see ``model/config.py``).

Anything we cannot represent exactly (an unknown architecture or field, yarn ``truncate: false``,
an ``rms_norm_eps`` other than 1e-6, ...) is an error naming the field. Weights: ``model/hf.py``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from absl import logging

from model.config import ModelConfig, YarnConfig
from model.rope import yarn_mscale

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
# ModelConfig fields with no config.json counterpart: how we run, not what the model computes.
EXEC_FIELDS = (
    "scan_layers",
    "remat",
    "kernels_impl",
    "moe_block_rows",
    "capacity_factor",
    "max_seq_len",
    "attention_impl",
)
# Every config.json field we know: mapped below, checked to have the one value we support, or
# without effect on the forward pass (bookkeeping, training-only knobs, derived sizes, and
# num_key_value_heads, which MLA does not have: every head reads the shared latent).
# Fields of every transformers config.json that do not change the forward pass (also model/hf_gqa.py).
BOOKKEEPING = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "use_cache",
    }
)
_KNOWN = BOOKKEEPING | {
    "auto_map",
    "output_router_logits",
    "router_aux_loss_coef",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "pretraining_tp",
    "attention_dropout",
    "num_key_value_heads",
    "head_dim",
    "qk_head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "moe_layer_freq",
    "quantization_config",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "rope_interleave",
    "scoring_func",
    "topk_method",
    "num_nextn_predict_layers",
    "rms_norm_eps",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_shared_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "max_position_embeddings",
    "generation_config",
    "is_decoder",
    "return_dict",
    "chunk_size_feed_forward",
}


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _need(cond: bool, field: str, value: Any, why: str):
    if not cond:
        raise ValueError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def _yarn_from_hf(rope: dict, max_pos: int) -> Optional[YarnConfig]:
    """transformers' ``_compute_yarn_parameters`` semantics -> YarnConfig (exactly, or an error)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    _need(kind == "yarn", "rope_scaling.type", kind, "only 'default' and 'yarn' RoPE are implemented")
    _need(
        rope.get("truncate", True),
        "rope_scaling.truncate",
        rope.get("truncate"),
        "our YaRN ramp always floors/ceils the correction range (transformers' truncate=True)",
    )
    omax = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / omax
    mscale, msad = rope.get("mscale"), rope.get("mscale_all_dim")
    af = rope.get("attention_factor")
    if af is None and mscale and msad:  # transformers' inferred ratio is exactly ours
        af, our_mscale = None, float(mscale)
    elif af is None:  # transformers then uses mscale(factor, 1), ignoring a lone mscale
        af = yarn_mscale(factor, 1.0)
    # Our cos/sin amplitude is mscale(s, mscale) / mscale(s, mscale_all_dim); solve for mscale.
    msad = float(msad or 0.0)
    if af is None:
        pass
    elif factor > 1:
        our_mscale = (af * yarn_mscale(factor, msad) - 1.0) / (0.1 * math.log(factor))
    else:
        _need(abs(af - 1.0) < 1e-12, "rope_scaling.attention_factor", af, "needs factor > 1")
        our_mscale = 1.0
    unknown = set(rope) - {
        "rope_type",
        "type",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
        "rope_theta",
    }
    _need(not unknown, "rope_scaling", sorted(unknown), "unknown YaRN keys")
    return YarnConfig(
        factor=float(factor),
        original_max_position_embeddings=int(omax),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(our_mscale),
        mscale_all_dim=msad,
    )


def config_from_hf(
    hf: dict, *, dtype: Optional[str] = None, mtp_depth: Optional[int] = None, **overrides
) -> ModelConfig:
    """config.json dict -> ModelConfig. ``overrides``: execution fields only (``EXEC_FIELDS``)."""
    unknown = sorted(set(hf) - _KNOWN)
    if unknown:
        raise ValueError(
            f"config.json has unknown field(s) {unknown}: not mapped to ModelConfig "
            f"(model/hf.py). Refusing to guess what they change."
        )
    arch = (hf.get("architectures") or [None])[0]
    _need(arch in ARCHITECTURES, "architectures", hf.get("architectures"), f"supported: {list(ARCHITECTURES)}")
    v3 = arch == "DeepseekV3ForCausalLM"
    g = hf.get
    _need(g("hidden_act", "silu") == "silu", "hidden_act", g("hidden_act"), "experts are SwiGLU (silu)")
    _need(not g("attention_bias", False), "attention_bias", g("attention_bias"), "MLA has no biases")
    _need(not g("mlp_bias", False), "mlp_bias", g("mlp_bias"), "FFNs have no biases")
    _need(not g("tie_word_embeddings", False), "tie_word_embeddings", g("tie_word_embeddings"), "head is untied")
    _need(g("moe_layer_freq", 1) == 1, "moe_layer_freq", g("moe_layer_freq"), "every block after the dense ones is MoE")
    _need(
        g("rms_norm_eps", 1e-6) == 1e-6,
        "rms_norm_eps",
        g("rms_norm_eps"),
        "transformers applies it to the block norms but 1e-6 to the MLA latent norms; ModelConfig.rms_eps is one value",
    )
    _need(g("n_routed_experts") is not None, "n_routed_experts", None, "dense models are not supported")
    q = g("quantization_config")
    if q is not None:
        _need(
            q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3",
            "quantization_config",
            q,
            "only DeepSeek's block-scaled FP8 (e4m3 + weight_scale_inv) is read",
        )
    if v3:  # transformers' V3 router: sigmoid + bias, top-2-sum group scores (DeepSeek's noaux_tc)
        _need(g("scoring_func", "sigmoid") == "sigmoid", "scoring_func", g("scoring_func"), "V3 routes with sigmoid")
        _need(g("topk_method", "noaux_tc") == "noaux_tc", "topk_method", g("topk_method"), "V3 uses noaux_tc")
        score_fn, bias, n_group, topk_group = "sigmoid", True, g("n_group") or 1, g("topk_group") or 1
        group_score = "top2_sum"
        interleave = bool(g("rope_interleave", True))
    else:  # transformers' V2 router: softmax, greedy top-k or group_limited_greedy (groups scored by max)
        _need(g("scoring_func", "softmax") == "softmax", "scoring_func", g("scoring_func"), "V2 routes with softmax")
        method = g("topk_method", "greedy")
        _need(
            method in ("greedy", "group_limited_greedy"),
            "topk_method",
            method,
            "V2 routes with 'greedy' or 'group_limited_greedy'",
        )
        limited = method == "group_limited_greedy"
        score_fn, bias, group_score = "softmax", False, "max"
        n_group, topk_group = (g("n_group") or 1, g("topk_group") or 1) if limited else (1, 1)
        interleave = True  # V2's complex-number RoPE rotates adjacent pairs
    rope = dict(g("rope_parameters") or g("rope_scaling") or {})
    theta = rope.get("rope_theta", g("rope_theta", 10000.0))
    fields = dict(
        vocab_size=g("vocab_size"),
        d_model=g("hidden_size"),
        n_layers=g("num_hidden_layers"),
        first_k_dense=g("first_k_dense_replace", 0),
        dense_ffn_dim=g("intermediate_size"),
        rms_eps=1e-6,
        max_seq_len=g("max_position_embeddings"),
        n_heads=g("num_attention_heads"),
        q_lora_rank=g("q_lora_rank"),
        kv_lora_rank=g("kv_lora_rank"),
        qk_nope_head_dim=g("qk_nope_head_dim"),
        qk_rope_head_dim=g("qk_rope_head_dim"),
        v_head_dim=g("v_head_dim"),
        rope_theta=float(theta),
        rope_interleave=interleave,
        yarn=_yarn_from_hf(rope, g("max_position_embeddings")),
        n_routed_experts=g("n_routed_experts"),
        n_shared_experts=g("n_shared_experts") or 0,
        n_experts_per_tok=g("num_experts_per_tok"),
        moe_ffn_dim=g("moe_intermediate_size"),
        score_fn=score_fn,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        norm_topk_prob=bool(g("norm_topk_prob", False)),
        routed_scaling_factor=float(g("routed_scaling_factor", 1.0)),
        use_aux_free_bias=bias,
        mtp_depth=g("num_nextn_predict_layers", 0) if mtp_depth is None else mtp_depth,
    )
    if dtype is None:
        src = g("torch_dtype") or g("dtype") or "float32"
        dtype = "bfloat16" if q is not None else {"float8_e4m3fn": "bfloat16"}.get(src, src)
    return with_execution(fields, dtype, overrides)


def with_execution(fields: dict, dtype: str, overrides: dict) -> ModelConfig:
    """The model ``fields`` from config.json, stored and computed in ``dtype``, run with the execution
    ``overrides`` (``EXEC_FIELDS`` only: anything else would change the model)."""
    bad = sorted(set(overrides) - set(EXEC_FIELDS))
    if bad:
        raise ValueError(f"from_pretrained overrides {bad} would change the model; only {EXEC_FIELDS} may be set")
    return ModelConfig(**{**fields, "param_dtype": dtype, "dtype": dtype, **overrides})


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> config.json for transformers' DeepseekV3ForCausalLM (sigmoid router, groups
    scored by a top-2 sum) or DeepseekV2ForCausalLM (softmax router, greedy top-k, or groups scored
    by their max: group_limited_greedy)."""
    v3 = cfg.score_fn == "sigmoid"
    limited = cfg.n_group > 1
    want = "top2_sum" if v3 else "max"
    if limited and cfg.group_score != want:
        raise ValueError(
            f"ModelConfig.group_score={cfg.group_score!r} with score_fn={cfg.score_fn!r} has no "
            f"transformers equivalent (DeepseekV{3 if v3 else 2} scores groups by {want!r})"
        )
    if not v3:
        for field, ok in (
            ("norm_topk_prob", not cfg.norm_topk_prob),
            ("use_aux_free_bias", not cfg.use_aux_free_bias),
            ("rope_interleave", cfg.rope_interleave),
        ):
            if not ok:
                raise ValueError(
                    f"ModelConfig.{field}={getattr(cfg, field)!r} has no transformers "
                    "DeepseekV2 (softmax router) equivalent"
                )
    if cfg.capacity_factor is not None:
        logging.warning("capacity_factor=%s is not exported: transformers' MoE is dropless.", cfg.capacity_factor)
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.first_k_dense,
        "intermediate_size": cfg.dense_ffn_dim,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rope_theta,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_experts_per_tok,
        "moe_intermediate_size": cfg.moe_ffn_dim,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "scoring_func": cfg.score_fn,
        "hidden_act": "silu",
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if limited else "greedy",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": cfg.param_dtype,
    }
    if v3:
        out["rope_interleave"] = cfg.rope_interleave
    if cfg.yarn is not None:
        out["rope_scaling"] = yarn_to_hf(cfg.yarn)
    return out


def yarn_to_hf(y: YarnConfig) -> dict:
    """YarnConfig -> transformers' ``rope_scaling`` (the inverse of ``_yarn_from_hf``)."""
    return {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        "mscale": y.mscale,
        "mscale_all_dim": y.mscale_all_dim,
        # transformers infers this from mscale/mscale_all_dim only when both are non-zero.
        "attention_factor": yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim),
    }
