"""Parity with transformers' Qwen3MoeForCausalLM and Qwen2MoeForCausalLM (model/hf_qwen_moe.py through
model/hf.py): import gives transformers' f32 logits, export is reloaded bit-exactly; refusals.
Skipped only where torch/transformers are absent."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import hf  # noqa: E402
from tests.model.test_hf import PARITY_ATOL  # noqa: E402
from tests.model.test_hf_gqa import BASE, _hf_logits, _hf_model, _ids  # noqa: E402

MOE = dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6)
# name -> (transformers class, config changes): GQA ratios 2, 1 (MHA) and n_heads (MQA); tied and
# untied heads; norm_topk_prob on and off; a leading dense block (mlp_only_layers); Qwen2-MoE's
# q/k/v biases and sigmoid-gated shared expert.
CONFIGS = {
    "qwen3moe_gqa2_norm": ("Qwen3Moe", dict(num_key_value_heads=2, head_dim=16, norm_topk_prob=True)),
    "qwen3moe_mha_tied_unnormalised_dense0": (
        "Qwen3Moe",
        dict(num_key_value_heads=4, tie_word_embeddings=True, norm_topk_prob=False, mlp_only_layers=[0]),
    ),
    "qwen3moe_mqa_topk3_sharded": (
        "Qwen3Moe",
        dict(num_key_value_heads=1, num_experts_per_tok=3, norm_topk_prob=True),
    ),
    "qwen2moe_gqa2_shared2_unnormalised": (
        "Qwen2Moe",
        dict(num_key_value_heads=2, shared_expert_intermediate_size=32, norm_topk_prob=False),
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_export_logits_match_transformers(name, tmp_path):
    kind, over = CONFIGS[name]
    m = _hf_model(kind, **{**MOE, **over})
    src = str(tmp_path / "src")
    m.save_pretrained(src, max_shard_size="20KB" if "sharded" in name else "1GB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json")) == ("sharded" in name)
    model = hf.from_pretrained(src)
    cfg = model.cfg
    assert (cfg.attention_type, cfg.score_fn, cfg.n_group, cfg.use_aux_free_bias) == ("gqa", "softmax", 1, False)
    assert (cfg.kv_heads, cfg.norm_topk_prob) == (over["num_key_value_heads"], over["norm_topk_prob"])
    assert cfg.first_k_dense == len(over.get("mlp_only_layers", []))
    assert cfg.shared_expert_gate == (kind == "Qwen2Moe") and cfg.n_shared_experts == (2 if kind == "Qwen2Moe" else 0)
    ids = _ids()
    ref = _hf_logits(m, ids)
    diff = np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref).max()
    print(f"{name}: max |logits - transformers| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= PARITY_ATOL

    out = str(tmp_path / "export")
    hf.save_pretrained(model, out, max_shard_bytes=30_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == f"{kind}ForCausalLM"
    assert np.abs(_hf_logits(back, ids) - ref).max() == 0.0  # same f32 weights, same library: bitwise


def _config(kind="Qwen3Moe", **over) -> dict:
    """config.json as transformers writes it."""
    conf = getattr(transformers, f"{kind}Config")(**{**BASE, **MOE, "num_key_value_heads": 2, **over})
    return {**json.loads(conf.to_json_string()), "architectures": [f"{kind}ForCausalLM"]}


@pytest.mark.parametrize(
    "kind, change, match",
    [
        ("Qwen3Moe", dict(decoder_sparse_step=2), "decoder_sparse_step"),
        ("Qwen3Moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
        ("Qwen3Moe", dict(shared_expert_intermediate_size=32), "shared_expert_intermediate_size"),  # not Qwen3's
        ("Qwen3Moe", dict(use_sliding_window=True), "use_sliding_window"),
        ("Qwen3Moe", dict(router_jitter=0.1), "router_jitter"),
        ("Qwen2Moe", dict(shared_expert_intermediate_size=24), "shared_expert_intermediate_size"),
        ("Qwen2Moe", dict(qkv_bias=False), "qkv_bias"),
    ],
)
def test_unsupported_config_is_refused(kind, change, match):
    conf = {**_config(kind), **change}
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(conf)


def test_export_refuses_routers_transformers_lacks():
    conf = hf.config_from_hf(_config())
    for change in (dict(routed_scaling_factor=2.5), dict(use_aux_free_bias=True), dict(score_fn="sigmoid")):
        with pytest.raises(ValueError, match="Qwen routes with softmax"):
            hf.config_to_hf(conf.replace(**change))
    with pytest.raises(ValueError, match="ungated shared experts"):
        hf.config_to_hf(conf.replace(n_shared_experts=1))
    back = hf.config_to_hf(conf)
    assert json.loads(json.dumps(back))["architectures"] == ["Qwen3MoeForCausalLM"]
