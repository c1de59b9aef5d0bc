"""Hugging Face configs of Qwen's MoE models: transformers' ``Qwen3MoeForCausalLM`` (Qwen3-30B-A3B,
Qwen3-235B-A22B) and ``Qwen2MoeForCausalLM`` (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

Each is its dense twin's attention (``Qwen3ForCausalLM``: per-head q/k RMSNorm; ``Qwen2ForCausalLM``:
q/k/v biases; mapped by ``model/hf_gqa.py``) with the Qwen-MoE feed-forward layer (``model/moe.py``):

  router       softmax over all experts, plain top-k, normalised if ``norm_topk_prob``, no bias,
               no groups, routed scaling 1 (transformers' ``Qwen2MoeTopKRouter``)
  Qwen3-MoE    no shared expert
  Qwen2-MoE    one shared SwiGLU of width ``shared_expert_intermediate_size`` (= n_shared_experts *
               moe_intermediate_size here) scaled per token by sigmoid(x . w_g) (``shared_expert_gate``)
  layout       block i is MoE unless i is in ``mlp_only_layers`` or (i + 1) % ``decoder_sparse_step``
               != 0. We run dense blocks first: only ``decoder_sparse_step = 1`` with
               ``mlp_only_layers = [0, ..., k-1]`` (``first_k_dense = k``; Qwen's releases use k = 0)

Tensors (``model/hf.py``): ``mlp.gate.weight`` -> router, ``mlp.experts.{i}.*`` -> routed experts,
``mlp.shared_expert.*`` -> shared, ``mlp.shared_expert_gate.weight`` [1, d] -> shared_gate [d, 1].
Anything else (interleaved layouts, sliding windows, unknown fields) is an error naming the field.
"""

from __future__ import annotations

from typing import Optional

from model import hf_gqa
from model.config import ModelConfig
from model.hf_config import _need

# architecture -> (model_type, the dense twin whose attention and config fields it shares)
ARCHITECTURES = {
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2ForCausalLM"),
}
# config.json fields of the MoE layer (the rest are the dense twin's, checked by hf_gqa)
_MOE_FIELDS = {
    "num_experts",
    "num_local_experts",  # transformers' Qwen3MoeConfig writes num_experts under this name
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "output_router_logits",  # training-only: return router logits
    "router_aux_loss_coef",  # training-only: transformers' aux-loss weight
}
_QWEN2_FIELDS = {"shared_expert_intermediate_size", "qkv_bias"}


def _layout(hf: dict) -> int:
    """first_k_dense from ``decoder_sparse_step`` / ``mlp_only_layers`` (or an error)."""
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = sorted(hf.get("mlp_only_layers") or [])
    _need(step == 1, "decoder_sparse_step", step, "interleaved dense / MoE blocks: only 1 (every block MoE)")
    _need(
        dense == list(range(len(dense))) and len(dense) <= n,
        "mlp_only_layers",
        dense,
        "dense blocks must be the first k blocks [0, ..., k-1] (first_k_dense)",
    )
    return len(dense)


def config_from_hf(
    hf: dict, *, dtype: Optional[str] = None, mtp_depth: Optional[int] = None, **overrides
) -> ModelConfig:
    """config.json of a Qwen3-MoE / Qwen2-MoE model -> ModelConfig. ``overrides``: execution fields."""
    arch = (hf.get("architectures") or [None])[0]
    _need(arch in ARCHITECTURES, "architectures", hf.get("architectures"), f"supported: {list(ARCHITECTURES)}")
    qwen2 = arch == "Qwen2MoeForCausalLM"
    moe_fields = _MOE_FIELDS | (_QWEN2_FIELDS if qwen2 else set())
    unknown = sorted(set(hf) - hf_gqa._KNOWN - moe_fields)
    if unknown:
        raise ValueError(f"config.json has unknown field(s) {unknown} for {arch}: refusing to guess what they change")
    g = hf.get
    if qwen2:
        _need(g("qkv_bias", True), "qkv_bias", g("qkv_bias"), "Qwen2-MoE's attention has q/k/v biases")
    twin = {k: v for k, v in hf.items() if k not in moe_fields}
    twin["architectures"] = [ARCHITECTURES[arch][1]]
    dense = hf_gqa.config_from_hf(twin, dtype=dtype, mtp_depth=mtp_depth, **overrides)
    e, f = g("num_experts", g("num_local_experts")), g("moe_intermediate_size")
    _need(g("num_local_experts", e) == e, "num_local_experts", g("num_local_experts"), f"num_experts says {e}")
    _need(isinstance(e, int) and e > 0, "num_experts", e, "a Qwen-MoE model needs routed experts")
    shared = 0
    if qwen2:
        fs = g("shared_expert_intermediate_size", 5632)
        _need(
            isinstance(fs, int) and fs > 0 and fs % f == 0,
            "shared_expert_intermediate_size",
            fs,
            f"the shared SwiGLU is n_shared_experts * moe_intermediate_size wide: need a positive multiple of {f}",
        )
        shared = fs // f
    return dense.replace(
        first_k_dense=_layout(hf),
        n_routed_experts=e,
        n_shared_experts=shared,
        shared_expert_gate=qwen2,
        n_experts_per_tok=g("num_experts_per_tok"),
        moe_ffn_dim=f,
        score_fn="softmax",
        n_group=1,
        topk_group=1,
        norm_topk_prob=bool(g("norm_topk_prob", False)),
        routed_scaling_factor=1.0,
        use_aux_free_bias=False,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig (GQA attention, Qwen-MoE blocks) -> config.json: Qwen2-MoE with the gated shared
    expert and q/k/v biases, Qwen3-MoE without shared experts and with q/k norms."""

    def need(ok: bool, why: str):
        if not ok:
            raise ValueError(f"ModelConfig cannot be exported as a transformers Qwen-MoE model: {why}")

    need(
        (cfg.score_fn, cfg.n_group, cfg.use_aux_free_bias, cfg.routed_scaling_factor) == ("softmax", 1, False, 1.0),
        "Qwen routes with softmax, no groups, no aux-free bias, routed_scaling_factor 1 (got "
        f"{cfg.score_fn!r}, n_group={cfg.n_group}, use_aux_free_bias={cfg.use_aux_free_bias}, "
        f"routed_scaling_factor={cfg.routed_scaling_factor})",
    )
    qwen2 = cfg.shared_expert_gate
    if qwen2:
        need(cfg.qkv_bias and not cfg.qk_norm, "Qwen2-MoE (gated shared expert) has q/k/v biases and no q/k norm")
    else:
        need(cfg.n_shared_experts == 0, "ungated shared experts (Qwen2-MoE gates them: shared_expert_gate)")
        need(cfg.qk_norm and not cfg.qkv_bias, "Qwen3-MoE (no shared expert) has q/k norms and no q/k/v biases")
    arch = "Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"
    out = hf_gqa.config_to_hf(cfg.replace(first_k_dense=cfg.n_layers, n_shared_experts=0, shared_expert_gate=False))
    out.update(
        architectures=[arch],
        model_type=ARCHITECTURES[arch][0],
        num_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_experts_per_tok,
        moe_intermediate_size=cfg.moe_ffn_dim,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(cfg.first_k_dense)),
    )
    if qwen2:
        out["shared_expert_intermediate_size"] = cfg.n_shared_experts * cfg.moe_ffn_dim
    return out
