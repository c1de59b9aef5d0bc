"""tools.compare_fp8 trains the bf16 and the fp8 run of each seed through the trainer, prints the
table, the gaps the metrics give and their mean / spread over the seeds, and plots."""

import json

import numpy as np
from etils import epath

from tools import compare_fp8
from tools.plot import read_metrics


def test_compare_runs_both_recipes_and_reports_their_gap(tmp_path, capsys):
    """End to end, one seed: two steps of a one-block model (no loss level asserted)."""
    out = tmp_path / "gap.png"
    args = ["--seeds=3", "--steps=2", "--batch=2", "--seq_len=32", "--eval_every=2", "--eval_batches=1"]
    small = ("model.n_layers=1", "model.first_k_dense=0", "model.mtp_depth=0", "train.peak_flops=1e12")  # one MoE block
    args += [f"--override={o}" for o in small] + [f"--out={out}"]
    result = compare_fp8.main([f"--workdir={tmp_path}", *args])
    final = {}
    for recipe in ("bf16", "fp8"):
        conf = json.loads((tmp_path / "seed3" / recipe / "config.json").read_text())
        assert conf["model"]["gemm_recipe"] == recipe and conf["model"]["n_layers"] == 1
        assert conf["train"]["seed"] == 3
        final[recipe] = [r["eval_loss"] for r in read_metrics(tmp_path / "seed3" / recipe) if "eval_loss" in r][-1]
    assert result["per_seed"][3]["final_eval_loss"] == final
    assert final["fp8"] != final["bf16"]  # the fp8 run really quantised
    gap = (final["fp8"] - final["bf16"]) / final["bf16"]
    assert result["per_seed"][3]["rel_gap"] == gap == result["mean_rel_gap"]
    assert result["sem_rel_gap"] is None  # one seed: no spread to report
    printed = capsys.readouterr().out
    assert f"| 3 | {final['bf16']:.4f} | {final['fp8']:.4f} | {100 * gap:+.3f}% |" in printed
    line = json.loads(next(s for s in printed.splitlines() if s.startswith("{")))
    assert line["mean_rel_gap"] == gap and line["seeds"] == [3]
    assert out.stat().st_size > 10_000


def test_several_seeds_give_the_mean_gap_its_standard_error_and_the_noise_floor(tmp_path):
    """The aggregation over seeds, on metrics written here (final eval losses known by hand)."""
    finals = {0: (2.0, 2.02), 1: (2.1, 2.079), 2: (1.9, 1.919)}  # seed: (bf16, fp8) -> gaps +1%, -1%, +1%
    for seed, losses in finals.items():
        for recipe, last in zip(("bf16", "fp8"), losses):
            d = tmp_path / f"seed{seed}" / recipe
            d.mkdir(parents=True)
            rows = [{"step": s, "main_loss": 3.0 - s / 10 + 0.01 * seed} for s in range(1, 11)]
            rows += [{"step": 5, "eval_loss": last + 0.5}, {"step": 10, "eval_loss": last}]
            (d / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"]))
            )
    result = compare_fp8.compare(epath.Path(tmp_path), [0, 1, 2])
    gaps = np.array([0.01, -0.01, 0.01])
    assert np.allclose([result["per_seed"][s]["rel_gap"] for s in finals], gaps)
    assert np.isclose(result["mean_rel_gap"], gaps.mean())
    assert np.isclose(result["std_rel_gap"], gaps.std(ddof=1))
    assert np.isclose(result["sem_rel_gap"], gaps.std(ddof=1) / np.sqrt(3))
    assert np.isclose(result["bf16_seed_spread"], np.std([2.0, 2.1, 1.9], ddof=1) / 2.0)
    text = compare_fp8.table(result, {})
    assert "| mean of 3 | | | +0.333% (std 1.155%) | |" in text
    assert "+- 0.667% (standard error)" in text and "noise floor): 5.000%" in text
    compare_fp8.plot(result, epath.Path(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
