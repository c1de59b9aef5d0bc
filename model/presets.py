"""Named model sizes. Numbers for the released models come from their config.json files
(DeepSeek-V3: hidden 7168, 61 layers of which 3 dense, 256 routed + 1 shared experts, top-8 in 8
groups keeping 4, MLA ranks 1536/512; DeepSeek-V2-Lite: 27 layers, 64 routed + 2 shared, top-6,
no query compression; Llama 3.1 and Qwen2.5: dense GQA models, ``attention_type="gqa"``).
``tests/model/test_presets.py`` checks the parameter counts against the
reports (V3: 671B total, 37B activated, Sec. 1 and 4.2) with ``jax.eval_shape``.

The big presets compute in bf16 (``dtype``) but keep float32 parameters: they are what the training
configs build on, and training keeps f32 master weights (V3 report Sec. 3.3). They carry the
released models' YaRN settings (for loading and fine-tuning those weights); pre-training recipes
(``configs/deepseek_v3_671b.py``) set ``yarn=None``: YaRN is the context-extension stage (Sec. 4.3).
"""

from model.config import Llama3RopeConfig, ModelConfig, YarnConfig

_DEEPSEEK_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)


def moe_tiny() -> ModelConfig:
    """DeepSeek-V3's structure at toy size: trains on a 2-core CPU in minutes (byte vocabulary)."""
    return ModelConfig()


def small() -> ModelConfig:
    """About 100M total parameters (~30M activated): a first real experiment on one accelerator."""
    return ModelConfig(
        vocab_size=264,
        d_model=512,
        n_layers=8,
        first_k_dense=1,
        dense_ffn_dim=1536,
        n_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        n_experts_per_tok=4,
        moe_ffn_dim=256,
        n_group=4,
        topk_group=2,
        mtp_depth=1,
        max_seq_len=4096,
    )


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, 2.4B activated; DeepSeek-V2 report, Appendix B)."""
    return ModelConfig(
        vocab_size=102400,
        d_model=2048,
        n_layers=27,
        first_k_dense=1,
        dense_ffn_dim=10944,
        n_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        n_experts_per_tok=6,
        moe_ffn_dim=1408,
        score_fn="softmax",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        use_aux_free_bias=False,
        mtp_depth=0,
        max_seq_len=163840,
        yarn=YarnConfig(mscale=0.707, mscale_all_dim=0.707, **_DEEPSEEK_YARN),
        dtype="bfloat16",
        scan_layers=True,
    )


def deepseek_v3_671b() -> ModelConfig:
    """DeepSeek-V3 / R1 (671B total, 37B activated, one MTP module; DeepSeek-V3 report Sec. 4.2)."""
    return ModelConfig(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        first_k_dense=3,
        dense_ffn_dim=18432,
        n_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        n_experts_per_tok=8,
        moe_ffn_dim=2048,
        score_fn="sigmoid",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mtp_depth=1,
        max_seq_len=163840,
        yarn=YarnConfig(mscale=1.0, mscale_all_dim=1.0, **_DEEPSEEK_YARN),
        dtype="bfloat16",
        scan_layers=True,
        remat="full",
    )


def _dense(**kw) -> ModelConfig:
    """A dense grouped-query-attention decoder (every block a SwiGLU, no MTP) in bf16 compute."""
    return ModelConfig(attention_type="gqa", first_k_dense=kw["n_layers"], mtp_depth=0, dtype="bfloat16", **kw)


def llama_tiny() -> ModelConfig:
    """Llama 3.1's structure at moe_tiny's size (GQA 4 query heads on 2 KV heads, Llama-3.1 RoPE
    scaling, dense SwiGLU in every block, untied head): the dense baseline of the tiny configs."""
    return ModelConfig(
        attention_type="gqa",
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        n_layers=4,
        first_k_dense=4,
        dense_ffn_dim=384,
        rms_eps=1e-5,
        rope_theta=500000.0,
        llama3_rope=Llama3RopeConfig(factor=8.0, original_max_position_embeddings=256),
        mtp_depth=0,
    )


def llama3_1_8b() -> ModelConfig:
    """Llama 3.1 8B (8.03B; Llama 3 report Table 3 and the released config.json)."""
    return _dense(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        dense_ffn_dim=14336,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        rms_eps=1e-5,
        rope_theta=500000.0,
        llama3_rope=Llama3RopeConfig(),
        max_seq_len=131072,
    )


def llama3_1_405b() -> ModelConfig:
    """Llama 3.1 405B (405.9B per the model card; Llama 3 report Table 3: 126 layers, d 16384,
    FFN 53248, 128 heads on 8 KV heads)."""
    return _dense(
        vocab_size=128256,
        d_model=16384,
        n_layers=126,
        dense_ffn_dim=53248,
        n_heads=128,
        n_kv_heads=8,
        head_dim=128,
        rms_eps=1e-5,
        rope_theta=500000.0,
        llama3_rope=Llama3RopeConfig(),
        max_seq_len=131072,
        remat="full",
    )


def qwen2_5_32b() -> ModelConfig:
    """Qwen2.5-32B, QwQ-32B's base (32.5B, 31.0B without embeddings; Qwen2.5 report Table 1 and
    the released config.json: q/k/v biases, 40 query heads on 8 KV heads, untied head)."""
    return _dense(
        vocab_size=152064,
        d_model=5120,
        n_layers=64,
        dense_ffn_dim=27648,
        n_heads=40,
        n_kv_heads=8,
        head_dim=128,
        qkv_bias=True,
        rms_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=131072,
        remat="full",
    )


PRESETS = {
    f.__name__: f
    for f in (moe_tiny, small, deepseek_v2_lite, deepseek_v3_671b, llama_tiny, llama3_1_8b, llama3_1_405b, qwen2_5_32b)
}


def get(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
