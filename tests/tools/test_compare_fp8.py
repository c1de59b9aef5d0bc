"""tools.compare_fp8 trains the bf16 and the fp8 run through the trainer, prints the table and the
gap the metrics give, and plots (two steps of a one-block model; no loss level asserted)."""

import json

from tools import compare_fp8
from tools.plot import read_metrics


def test_compare_runs_both_recipes_and_reports_their_gap(tmp_path, capsys):
    out = tmp_path / "gap.png"
    args = ["--steps=2", "--batch=2", "--seq_len=32", "--eval_every=2", "--eval_batches=1"]
    small = ("model.n_layers=1", "model.first_k_dense=0", "model.mtp_depth=0", "train.peak_flops=1e12")  # one MoE block
    args += [f"--override={o}" for o in small] + [f"--out={out}"]
    result = compare_fp8.main([f"--workdir={tmp_path}", *args])
    final = {}
    for recipe in ("bf16", "fp8"):
        conf = json.loads((tmp_path / recipe / "config.json").read_text())
        assert conf["model"]["gemm_recipe"] == recipe and conf["model"]["n_layers"] == 1
        final[recipe] = [r["eval_loss"] for r in read_metrics(tmp_path / recipe) if "eval_loss" in r][-1]
    assert result["final_eval_loss"] == final
    assert final["fp8"] != final["bf16"]  # the fp8 run really quantised
    assert result["rel_gap"] == (final["fp8"] - final["bf16"]) / final["bf16"]
    printed = capsys.readouterr().out
    assert f"| fp8 | {final['fp8']:.4f} | {100 * result['rel_gap']:+.3f}% |" in printed
    assert out.stat().st_size > 10_000
