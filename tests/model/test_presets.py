"""Preset parameter counts against the papers, computed abstractly (jax.eval_shape)."""

import pytest

from model import presets
from model.param_count import count_params


def test_deepseek_v3_671b_counts():
    c = count_params(presets.deepseek_v3_671b())
    assert abs(c["total_params"] - 671e9) / 671e9 < 0.01  # report Sec. 1: 671B total
    assert abs(c["activated_params"] - 37e9) / 37e9 < 0.03  # 37B activated per token
    assert abs(c["mtp_params"] - 11.5e9) / 11.5e9 < 0.02  # report Sec. 4.2 / weights notes: ~11.5B unique MTP


def test_deepseek_v2_lite_counts():
    c = count_params(presets.deepseek_v2_lite())
    assert abs(c["total_params"] - 15.7e9) / 15.7e9 < 0.01  # V2 report, Appendix B: 15.7B
    # 2.4B activated excludes the embedding matrix; ours counts the output head and embedding
    assert abs(c["activated_params"] - c["components"]["embed"] - 2.4e9) / 2.4e9 < 0.03
    assert c["mtp_params"] == 0


@pytest.mark.parametrize("name", ["moe_tiny", "small"])
def test_small_presets(name):
    c = count_params(presets.get(name))
    assert 0 < c["activated_params"] < c["total_params"]
    if name == "small":
        assert 80e6 < c["total_params"] < 120e6


def test_count_params_cli(capsys):
    import subprocess
    import sys

    out = (
        subprocess.run(
            [sys.executable, "-m", "tools.count_params", "--config=configs/deepseek_v3_671b.py"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert out[-3].startswith("total_params: ") and out[-2].startswith("activated_params: ")
    assert out[-1].startswith("mtp_params: ")
    assert abs(int(out[-3].split()[1]) - 671e9) / 671e9 < 0.01


@pytest.mark.parametrize(
    "name, published",
    [
        ("llama3_1_8b", 8.03e9),  # model card: 8.03B
        ("llama3_1_405b", 405.9e9),  # model card: 405.9B (hf.co/meta-llama/Llama-3.1-405B, safetensors)
        ("qwen2_5_32b", 32.5e9),  # Qwen2.5-32B / QwQ-32B model card: 32.5B
    ],
)
def test_dense_presets_counts(name, published):
    cfg = presets.get(name)
    c = count_params(cfg)
    assert abs(c["total_params"] - published) / published < 0.01, c["total_params"]
    assert c["activated_params"] == c["total_params"] and c["mtp_params"] == 0  # dense: all of it, every token
    assert set(c["components"]) == {
        "embed",
        "head",
        "final_norm",
        "dense_blocks.attention",
        "dense_blocks.ffn",
        "dense_blocks.norms",
    }
    if name == "qwen2_5_32b":  # 31.0B without the embedding and the head (model card)
        non_embedding = c["total_params"] - c["components"]["embed"] - c["components"]["head"]
        assert abs(non_embedding - 31.0e9) / 31.0e9 < 0.01


def test_qwen3_30b_a3b_counts():
    c = count_params(presets.qwen3_30b_a3b())
    total, comps = c["total_params"], c["components"]
    assert abs(total - 30.5e9) / 30.5e9 < 0.01  # model card: 30.5B in total (ours 30.53B)
    non_embedding = total - comps["embed"] - comps["head"]
    assert abs(non_embedding - 29.9e9) / 29.9e9 < 0.01  # model card: 29.9B non-embedding
    # Model card "3.3B activated": ours is 3.353B (48 x (attention + router + 8 of 128 experts) plus
    # the embedding and the head); the card truncates to one decimal, as "22B" for Qwen3-235B-A22B's
    # 22.19B by the same count.
    assert 3.3e9 <= c["activated_params"] < 3.4e9
    assert "moe_blocks.shared_experts" not in comps and not any(k.startswith("dense") for k in comps)
    assert c["mtp_params"] == 0
