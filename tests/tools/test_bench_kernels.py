"""tools.bench_kernels' fp8-vs-bf16 part: DeepSeek-V3's GEMM shapes, and one JSON line per (GEMM,
mode, recipe) with a time and the fp8/bf16 ratio on a tiny config (no timing asserted)."""

import json

from model import presets
from model.config import ModelConfig
from tools import bench_kernels


def test_v3_gemm_shapes_are_deepseek_v3s():
    g = {x["name"]: x for x in bench_kernels.v3_gemms(presets.deepseek_v3_671b(), tokens=8192, groups=32)}
    assert {k: g[k]["w"] for k in g if "w" in g[k]} == {
        "mla.wq_a": (7168, 1536),
        "mla.wq_b": (1536, 128, 192),
        "mla.wkv_a": (7168, 576),
        "mla.wkv_b": (512, 128, 256),
        "mla.wo": (128, 128, 7168),
        "dense_ffn.gate_up": (7168, 18432),
        "dense_ffn.down": (18432, 7168),
        "shared_expert.gate_up": (7168, 2048),
        "shared_expert.down": (2048, 7168),
    }
    assert {(g[k]["m"], g[k]["k"], g[k]["n"], g[k]["groups"]) for k in ("experts.gate_up", "experts.down")} == {
        (8192, 7168, 2048, 32),
        (8192, 2048, 7168, 32),
    }


def test_flops_count_the_model_gemm():
    """2 * tokens * K * N per product, K and N the weight's contracted and output axes."""
    cfg = ModelConfig(d_model=128, n_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)
    g = {x["name"]: x for x in bench_kernels.v3_gemms(cfg, tokens=8, groups=2)}
    assert bench_kernels.gemm_flops(g["mla.wo"]) == 2 * 8 * (2 * 64) * 128  # K = h v
    assert bench_kernels.gemm_flops(g["mla.wq_b"]) == 2 * 8 * 64 * (2 * 128)  # N = h (n + r)
    assert bench_kernels.gemm_flops(g["experts.down"]) == 2 * 8 * 64 * 128


def test_bench_fp8_prints_both_recipes_with_their_ratio(capsys):
    """One projection (two K axes) and one grouped expert GEMM, forward and forward + backward."""
    cfg = ModelConfig(d_model=128, n_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, moe_ffn_dim=128)
    gemms = ("mla.wo", "experts.down")
    bench_kernels.bench_fp8(True, 1, cfg=cfg, tokens=8, groups=2, gemms=gemms, impl="scan")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r for r in rows if "error" in r] == []
    assert [(r["gemm"], r["mode"], r["recipe"]) for r in rows] == [
        (n, m, rc) for n in gemms for m in ("fwd", "fwd_bwd") for rc in ("bf16", "fp8")
    ]
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0
        assert ("fp8_over_bf16" in r) == (r["recipe"] == "fp8")
