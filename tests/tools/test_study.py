"""tools/study_*.py: one study end to end at toy size (its arm trains with the normal trainer, the
table and the plot are written from the run's numbers), and the other studies' arithmetic."""

import json
import math

import pytest

from model.config import ModelConfig
from tools import study, study_balance, study_dense
from train.flops import model_flops_per_token

# Three-step runs of a 2-block model on short sequences: the study's plumbing, not its result.
TOY = {
    "model.d_model": 32,
    "model.n_layers": 2,
    "data.seq_len": 32,
    "train.global_batch_size": 4,
    "train.steps": 3,
    "train.eval_every": 3,
    "train.eval_batches": 1,
    "optimizer.warmup_steps": 1,
}


def test_parse_overrides():
    assert study.parse_overrides(["train.steps=2", "model.score_fn=softmax", "x.y=1e-3"]) == {
        "train.steps": 2,
        "model.score_fn": "softmax",
        "x.y": 1e-3,
    }
    with pytest.raises(ValueError, match="field=value"):
        study.parse_overrides(["train.steps"])


def test_study_balance_aux_loss_arm_end_to_end(tmp_path):
    """The classic-loss arm: its balance_loss metric is the batch-wise loss alone (the sequence-wise
    alpha is 0 in the study), so a trainer that ignored train.aux_loss_alpha would log 0."""
    (r,) = study_balance.run(tmp_path / "runs", tmp_path / "balance.png", common=TOY, arms=["aux_loss"])
    assert r["name"] == "aux_loss" and r["summary"]["steps"] == 3
    assert r["final_balance_loss"] > 0.005  # 0.01 x sum_i f_i P_i, which is >= ~1 for any routing
    assert r["maxvio_mean"] >= 0 and r["final_eval_loss"] == r["summary"]["final_eval_loss"]
    (line,) = [json.loads(x) for x in (tmp_path / "runs" / "study.jsonl").read_text().splitlines()]
    assert line["overrides"]["train.aux_loss_alpha"] == 0.01 and "--config.train.aux_loss_alpha=0.01" in line["command"]
    assert "| aux_loss | 0 |" in (tmp_path / "runs" / "table.md").read_text()
    assert (tmp_path / "balance.png").stat().st_size > 10_000
    # --reuse keeps this run only for the same resolved config
    assert study._finished_with(tmp_path / "runs" / "aux_loss", r["config"])
    other = study.load_config(study.DEFAULT_CONFIG, {**r["overrides"], "train.aux_loss_alpha": 0.001})
    assert not study._finished_with(tmp_path / "runs" / "aux_loss", other)


def test_dense_arms_match_the_moe_training_flops():
    """Both dense arms (MLA blocks; the Llama-style GQA model) have a dense SwiGLU in every block and
    the MoE's training FLOPs per token, to within one unit of dense_ffn_dim."""
    common = dict(study_dense.COMMON)
    by_name = {a.name: a for a in study_dense.arms(study.DEFAULT_CONFIG, common)}
    dense = [by_name["dense_mla"], by_name["dense_llama"]]
    moe_cfg = study.load_config(study.DEFAULT_CONFIG, common)
    seq = moe_cfg.data.seq_len
    moe_f = model_flops_per_token(ModelConfig.from_dict(moe_cfg.model.to_dict()), seq)
    kinds = []
    for arm in dense:
        cfg = study.load_config(arm.config_file or study.DEFAULT_CONFIG, {**common, **arm.overrides})
        assert cfg.model.first_k_dense == cfg.model.n_layers
        dense_f = model_flops_per_token(ModelConfig.from_dict(cfg.model.to_dict()), seq)
        per_unit = 6 * 3 * cfg.model.d_model * cfg.model.n_layers  # one more unit of dense_ffn_dim
        assert abs(dense_f - moe_f) <= per_unit / 2
        kinds.append(cfg.model.attention_type)
    assert kinds == ["mla", "gqa"]


def test_flops_to_reach_interpolates_in_log_flops():
    assert study_dense.flops_to_reach([1e9, 1e11], [3.0, 2.0], 2.5) == pytest.approx(1e10)
    assert study_dense.flops_to_reach([1e9, 1e11], [3.0, 2.0], 3.5) == 1e9
    assert study_dense.flops_to_reach([1e9, 1e11], [3.0, 2.5], 2.0) is None
    assert math.isclose(study_dense.flops_to_reach([1, 4, 16], [5, 4, 3], 3.5), 8.0)
