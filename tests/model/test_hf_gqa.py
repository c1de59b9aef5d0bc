"""Parity with transformers' LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (model/hf_gqa.py
through model/hf.py): import gives transformers' f32 logits, export is reloaded bit-exactly; refusals.
Skipped only where torch/transformers are absent."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from model import hf  # noqa: E402
from tests.model.test_hf import PARITY_ATOL  # noqa: E402

V = 96
BASE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
# name -> (transformers class, config changes): GQA ratios 1 (MHA), 2 and n_heads (MQA); tied and
# untied heads; Llama-3.1 and YaRN RoPE scaling; Qwen2's q/k/v biases; Qwen3's q/k norms.
CONFIGS = {
    "llama_mha_tied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa2_llama3_headdim12_sharded": (
        "Llama",
        dict(num_key_value_heads=2, head_dim=12, rope_parameters=dict(LLAMA3, original_max_position_embeddings=8)),
    ),
    "llama_mqa": ("Llama", dict(num_key_value_heads=1)),
    "qwen2_gqa2_bias_yarn_tied": (
        "Qwen2",
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=YARN, rms_norm_eps=1e-6),
    ),
    "qwen3_gqa2_qknorm": ("Qwen3", dict(num_key_value_heads=2, head_dim=16)),
}


def _hf_model(kind, **over):
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **over}, attn_implementation="eager")
    torch.manual_seed(0)
    m = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # norms around 1, biases and weights random (transformers inits biases to 0)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.1)
    return m


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _ids(b=2, t=24, seed=0):
    return np.random.RandomState(seed).randint(0, V, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_export_logits_match_transformers(name, tmp_path):
    kind, over = CONFIGS[name]
    m = _hf_model(kind, **over)
    src = str(tmp_path / "src")
    m.save_pretrained(src, max_shard_size="20KB" if "sharded" in name else "1GB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json")) == ("sharded" in name)
    model = hf.from_pretrained(src)
    cfg = model.cfg
    assert (cfg.attention_type, cfg.first_k_dense, cfg.kv_heads) == ("gqa", 2, over["num_key_value_heads"])
    assert cfg.tie_word_embeddings == over.get("tie_word_embeddings", False) and cfg.qkv_bias == (kind == "Qwen2")
    ids = _ids()
    ref = _hf_logits(m, ids)
    diff = np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref).max()
    print(f"{name}: max |logits - transformers| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= PARITY_ATOL

    out = str(tmp_path / "export")
    hf.save_pretrained(model, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == f"{kind}ForCausalLM"
    assert np.abs(_hf_logits(back, ids) - ref).max() == 0.0  # the same f32 weights: bitwise the same logits
    written = load_file(os.path.join(out, "model.safetensors"))
    original = {k: v.detach().numpy() for k, v in m.state_dict().items() if "rotary" not in k}
    if cfg.tie_word_embeddings:
        original.pop("lm_head.weight")  # the embedding itself; transformers writes it once
    assert set(written) == set(original)
    for k, a in original.items():
        np.testing.assert_array_equal(written[k], a, err_msg=k)


def test_tied_checkpoint_with_a_stored_head(tmp_path):
    """A tied checkpoint that stores lm_head too: an equal copy loads silently, the head is the embedding."""
    m = _hf_model("Llama", num_key_value_heads=2, tie_word_embeddings=True)
    src = str(tmp_path / "src")
    m.save_pretrained(src)
    t = load_file(os.path.join(src, "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"]
    save_file(t, os.path.join(src, "model.safetensors"))
    model = hf.from_pretrained(src)
    assert not hasattr(model, "head")
    ids = _ids(1, 8)
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - _hf_logits(m, ids)).max() <= PARITY_ATOL


def _edit_config(path, **changes):
    conf = json.load(open(os.path.join(path, "config.json")))
    conf.update(changes)
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))


def test_unsupported_config_fields_are_refused(tmp_path):
    src = str(tmp_path / "src")
    _hf_model("Qwen2", num_key_value_heads=2).save_pretrained(src)
    for change, pattern in [
        (dict(use_sliding_window=True), "'use_sliding_window'"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "'layer_types'"),
        (dict(architectures=["MistralForCausalLM"]), "'architectures'"),
        (dict(attention_bias=True), "'attention_bias'"),
        (dict(mlp_bias=True), "'mlp_bias'"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_scaling.type"),
        (dict(rope_parameters=dict(LLAMA3, original_max_position_embeddings=8, extra=1)), "unknown llama3"),
        (dict(partial_rotary_factor=0.5), "unknown field"),
    ]:
        d = str(tmp_path / f"cfg{len(os.listdir(tmp_path))}")
        shutil.copytree(src, d)
        _edit_config(d, **change)
        with pytest.raises(ValueError, match=pattern):
            hf.from_pretrained(d)
