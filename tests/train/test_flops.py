import pytest

from model.config import ModelConfig
from tests.util import tiny_config
from train import flops


def _cfg(**kw):
    base = dict(vocab_size=300, d_model=16, n_layers=3, first_k_dense=1, dense_ffn_dim=40, n_heads=2,
                q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=5,
                n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_ffn_dim=12,
                n_group=1, topk_group=1, mtp_depth=1)
    base.update(kw)
    return tiny_config(**base)


def test_flops_by_hand():
    cfg = _cfg()
    # Per block, by hand (d=16, h=2, d_qk=6):
    q = 16 * 8 + 8 * 2 * 6                     # 224
    kv = 16 * (6 + 2) + 6 * 2 * (4 + 5)        # 128 + 108 = 236
    o = 2 * 5 * 16                             # 160
    attn = q + kv + o                          # 620
    dense = 3 * 16 * 40                        # 1920
    moe = 16 * 8 + (1 + 2) * 3 * 16 * 12       # 128 + 1728 = 1856
    head = 16 * 300                            # 4800
    mtp = 2 * 16 * 16 + attn + moe + head      # 512 + 620 + 1856 + 4800 = 7788
    n_main = 3 * attn + 1 * dense + 2 * moe + head
    assert n_main == 1860 + 1920 + 3712 + 4800
    parts = flops.activated_params(cfg)
    assert parts["mtp"] == mtp and parts["total"] == n_main + mtp
    t = 32
    attn_flops = 6 * (3 + 1) * t * 2 * (6 + 5) / 2
    assert flops.model_flops_per_token(cfg, t) == pytest.approx(6 * (n_main + mtp) + attn_flops)
    assert flops.model_flops_per_token(cfg, t, include_mtp=False, causal=False) == pytest.approx(
        6 * n_main + 6 * 3 * t * 2 * 11)


def test_no_q_lora_and_no_mtp():
    cfg = _cfg(q_lora_rank=None, mtp_depth=0)
    with_lora = flops.activated_params(_cfg(mtp_depth=0))
    parts = flops.activated_params(cfg)
    assert parts["attention"] - with_lora["attention"] == 3 * (16 * 2 * 6 - (16 * 8 + 8 * 2 * 6))
    assert parts["mtp"] == 0


def test_peak_flops():
    assert flops.peak_flops(1e15) == (1e15, "config")
    value, source = flops.peak_flops(None, n=128, reps=2)
    assert value > 0 and source.startswith("measured") and "128x128" in source


def test_deepseek_v3_activated_params():
    # V3 report Table 1 / abstract: 37B activated per token (main model; + 0.93B embedding here).
    v3 = ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, first_k_dense=3, dense_ffn_dim=18432,
                     n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                     n_experts_per_tok=8, moe_ffn_dim=2048, n_group=8, topk_group=4, mtp_depth=1)
    n = flops.activated_params(v3, include_mtp=False)["total"] + v3.vocab_size * v3.d_model
    assert n == pytest.approx(37e9, rel=0.03)
