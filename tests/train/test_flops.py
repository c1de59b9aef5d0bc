import pytest

from model.config import ModelConfig
from tests.util import tiny_config
from train import flops


def _cfg(**kw):
    base = dict(
        vocab_size=300,
        d_model=16,
        n_layers=3,
        first_k_dense=1,
        dense_ffn_dim=40,
        n_heads=2,
        q_lora_rank=8,
        kv_lora_rank=6,
        qk_nope_head_dim=4,
        qk_rope_head_dim=2,
        v_head_dim=5,
        n_routed_experts=8,
        n_shared_experts=1,
        n_experts_per_tok=2,
        moe_ffn_dim=12,
        n_group=1,
        topk_group=1,
        mtp_depth=1,
    )
    base.update(kw)
    return tiny_config(**base)


def test_flops_by_hand():
    cfg = _cfg()
    # Per block, by hand (d=16, h=2, d_qk=6):
    q = 16 * 8 + 8 * 2 * 6  # 224
    kv = 16 * (6 + 2) + 6 * 2 * (4 + 5)  # 128 + 108 = 236
    o = 2 * 5 * 16  # 160
    attn = q + kv + o  # 620
    dense = 3 * 16 * 40  # 1920
    moe = 16 * 8 + (1 + 2) * 3 * 16 * 12  # 128 + 1728 = 1856
    head = 16 * 300  # 4800
    mtp = 2 * 16 * 16 + attn + moe + head  # 512 + 620 + 1856 + 4800 = 7788
    n_main = 3 * attn + 1 * dense + 2 * moe + head
    assert n_main == 1860 + 1920 + 3712 + 4800
    parts = flops.activated_params(cfg)
    assert parts["mtp"] == mtp and parts["total"] == n_main + mtp
    t = 32
    attn_flops = 6 * (3 + 1) * t * 2 * (6 + 5) / 2
    assert flops.model_flops_per_token(cfg, t) == pytest.approx(6 * (n_main + mtp) + attn_flops)
    assert flops.model_flops_per_token(cfg, t, include_mtp=False, causal=False) == pytest.approx(
        6 * n_main + 6 * 3 * t * 2 * 11
    )


def test_no_q_lora_and_no_mtp():
    cfg = _cfg(q_lora_rank=None, mtp_depth=0)
    with_lora = flops.activated_params(_cfg(mtp_depth=0))
    parts = flops.activated_params(cfg)
    assert parts["attention"] - with_lora["attention"] == 3 * (16 * 2 * 6 - (16 * 8 + 8 * 2 * 6))
    assert parts["mtp"] == 0


def test_qwen2_moe_shared_expert_gate_counts_its_d_weights():
    """Qwen2-MoE's shared-expert gate w_g [d, 1] is one more d-vector per MoE layer (and MTP module)."""
    plain = flops.activated_params(_cfg(score_fn="softmax"))
    gated = flops.activated_params(_cfg(score_fn="softmax", shared_expert_gate=True))
    assert gated["moe_ffn"] - plain["moe_ffn"] == 2 * 16 and gated["mtp"] - plain["mtp"] == 16


def test_gqa_flops_by_hand():
    """GQA (attention_type "gqa"): q, o of h heads and k, v of j heads, head dim k; not MLA's terms."""
    cfg = _cfg(attention_type="gqa", n_heads=4, n_kv_heads=2, head_dim=6, mtp_depth=0)
    attn = 16 * 4 * 6 + 2 * 16 * 2 * 6 + 4 * 6 * 16  # q 384 + k, v 384 + o 384
    parts = flops.activated_params(cfg)
    assert parts["attention"] == 3 * attn
    t = 32
    n = parts["total"]
    assert flops.model_flops_per_token(cfg, t) == pytest.approx(6 * n + 6 * 3 * t * 4 * (6 + 6) / 2)


@pytest.mark.parametrize("q_lora_rank,gqa", [(64, False), (None, False), (None, True)])
def test_flops_match_xla_cost_analysis(q_lora_rank, gqa):
    """FLOPs per step = XLA's own count of the compiled forward + backward, within the elementwise
    work (norms, softmax, RoPE) the formula leaves out. Dense blocks, naive attention (full [t, t]
    scores, so causal=False) and the head; the MoE layers run loops that cost_analysis counts once,
    so their term is checked by hand above. At t=128 the attention term is ~14% of the total: a
    wrong attention count (e.g. halved) moves the ratio out of the 3% band."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.transformer import Transformer

    cfg = _cfg(
        vocab_size=512,
        d_model=128,
        n_layers=2,
        first_k_dense=2,
        dense_ffn_dim=384,
        n_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        mtp_depth=0,
        attention_impl="naive",
        **(dict(attention_type="gqa", n_kv_heads=2, head_dim=32) if gqa else {}),
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    b, t = 2, 128
    tokens = jnp.zeros((b, t), jnp.int32)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(tokens).logits ** 2)

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops.model_flops_per_token(cfg, t, include_mtp=False, causal=False) * b * t
    assert cost["flops"] == pytest.approx(ours, rel=0.03)


def test_deepseek_v3_activated_params():
    # V3 report Table 1 / abstract: 37B activated per token (main model; + 0.93B embedding here).
    v3 = ModelConfig(
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
        n_group=8,
        topk_group=4,
        mtp_depth=1,
    )
    n = flops.activated_params(v3, include_mtp=False)["total"] + v3.vocab_size * v3.d_model
    assert n == pytest.approx(37e9, rel=0.03)
