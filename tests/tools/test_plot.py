"""tools.plot: panels and baselines, a fixed-size expert-load heatmap for 58 MoE layers named by block,
overlaid runs, and a metrics.jsonl read line by line."""

import json

import matplotlib.image
import numpy as np
import pytest

from tools import plot

V3 = {"n_layers": 61, "first_k_dense": 3, "mtp_depth": 1}  # DeepSeek-V3: 58 MoE blocks + the MTP module


def write_run(workdir, *, model=V3, n_experts=256, steps=200, every=10, seed=0, unigram=4.7):
    """A synthetic run: train lines every ``every`` steps with per-layer loads, evals, summary, config."""
    rng = np.random.default_rng(seed)
    n_rows = model["n_layers"] - model["first_k_dense"] + model["mtp_depth"]
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as fh:
        for step in range(every, steps + 1, every):
            skew = 3.0 * (1 - step / steps) + 0.3  # imbalance that the bias update removes over time
            load = rng.dirichlet(np.full(n_experts, 1 / skew), size=n_rows)
            loss = 5 * (step / steps + 0.1) ** -0.3 + 0.1 * rng.standard_normal()
            line = {"step": step, "loss": loss, "main_loss": 0.8 * loss, "mtp_loss": 0.9 * loss}
            line |= {"lr": 1e-3 * min(1, step / 50), "grad_norm": float(rng.lognormal(0, 0.3)), "balance_loss": 1e-3}
            line |= {"maxvio": (load.max(-1) * n_experts - 1).tolist(), "expert_load": load.round(6).tolist()}
            fh.write(json.dumps(line) + "\n")
            if step % 50 == 0:
                fh.write(json.dumps({"step": step, "eval_loss": loss, "eval_bits_per_byte": loss / 1.5}) + "\n")
    (workdir / "summary.json").write_text(json.dumps({"unigram_bits_per_byte": unigram}))
    (workdir / "config.json").write_text(json.dumps({"model": model}))
    return workdir


def test_layer_names_follow_the_blocks():
    names = plot.layer_names(59, V3)
    assert names[0] == "block 3" and names[57] == "block 60" and names[58] == "MTP 1"
    assert plot.layer_names(4, V3) == [f"MoE layer {i}" for i in range(4)]  # config does not match: plain indices


def test_expert_load_heatmap_has_a_fixed_size(tmp_path):
    big = write_run(tmp_path / "v3", steps=40)
    small = write_run(
        tmp_path / "tiny", model={"n_layers": 4, "first_k_dense": 1, "mtp_depth": 1}, n_experts=16, steps=40
    )
    shapes = []
    for run in (big, small):
        rows, config = plot.read_metrics(run), json.loads((run / "config.json").read_text())
        path = plot.plot_expert_load(rows, run / "expert_load.png", config["model"])
        shapes.append(matplotlib.image.imread(str(path)).shape)
    assert shapes[0] == shapes[1]


def test_overlay_of_runs(tmp_path):
    tiny = {"model": {"n_layers": 4, "first_k_dense": 1, "mtp_depth": 1}, "n_experts": 16, "steps": 100}
    a, b = write_run(tmp_path / "a", **tiny), write_run(tmp_path / "b", seed=1, unigram=4.5, **tiny)
    out = tmp_path / "cmp"
    paths = plot.plot_runs([a, b], out, ["lr3e-3", "lr1e-3"])
    assert sorted(p.name for p in paths) == ["expert_load-lr1e-3.png", "expert_load-lr3e-3.png", "loss.png"]
    with pytest.raises(ValueError, match="give --out"):
        plot.plot_runs([a, b])
    with pytest.raises(ValueError, match="1 --label for 2 --workdir"):
        plot.plot_runs([a, b], out, ["x"])


def test_metrics_are_read_line_by_line(tmp_path):
    run = write_run(tmp_path / "r", steps=20)
    rows = plot.iter_metrics(run)
    first = next(rows)
    assert first["step"] == 10 and first["expert_load"].dtype == np.float32 and first["expert_load"].shape == (59, 256)
    with open(run / "metrics.jsonl", "a") as fh:  # a line appended while reading is read: nothing was slurped
        fh.write(json.dumps({"step": 30, "loss": 1.0}) + "\n")
    assert [r["step"] for r in rows] == [20, 30]


def test_smoothing_is_debiased_and_skips_nan():
    out = plot.smooth(np.array([2.0, np.nan, 2.0, 4.0]), 0.5)
    assert out.tolist() == pytest.approx(
        [2.0, 2.0, 2.0, 2.75 / 0.875]
    )  # (0.25 * 2 + 0.5 * 2 + 4) / (0.25 + 0.5 + 1) * 0.5


def write_rl_run(workdir, *, steps=40, eval_every=20, seed=0):
    """A synthetic GRPO run: a train line per step (as train/rl/trainer.py writes them), a held-out
    accuracy line at step 0 and every ``eval_every`` steps, after that step's train line."""
    rng = np.random.default_rng(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"step": 0, "heldout_accuracy": 0.1}) + "\n")
        for step in range(1, steps + 1):
            acc = min(1.0, 0.1 + step / steps * 0.5 + 0.05 * rng.standard_normal())
            line = {"step": step, "reward_mean": acc + 0.1, "reward_std": 0.3, "accuracy": acc}
            line |= {"reward/correct_mean": acc, "reward/correct_std": 0.3, "reward/format_mean": 1.0}
            line |= {"reward/format_std": 0.0, "kl": 1e-3 * step, "entropy": 0.5, "loss": 0.01}
            line |= {"completion_length_mean": 12.0 + rng.standard_normal(), "completion_length_max": 20}
            fh.write(json.dumps(line) + "\n")
            if step % eval_every == 0:
                fh.write(json.dumps({"step": step, "heldout_accuracy": acc}) + "\n")
    return workdir


def _capture_figures(monkeypatch):
    """{file name: {axes title: [line labels]}} of every figure tools.plot saves."""
    drawn, save = {}, plot._save

    def spy(fig, path):
        drawn[path.name] = {ax.get_title(): [l.get_label() for l in ax.get_lines()] for ax in fig.axes}
        return save(fig, path)

    monkeypatch.setattr(plot, "_save", spy)
    return drawn


def test_rl_run_draws_reward_accuracy_and_length(tmp_path, monkeypatch):
    drawn = _capture_figures(monkeypatch)
    run = write_rl_run(tmp_path / "g")
    paths = plot.plot_runs([run])
    assert [p.name for p in paths] == ["rl.png"] and paths[0].stat().length > 0
    panels = drawn["rl.png"]
    assert set(panels) == {
        "reward (smoothed; raw faint)",
        "accuracy",
        "completion length",
        "policy: KL (k3) and entropy",
    }
    assert {"total (weighted)", "correct", "format"} <= set(panels["reward (smoothed; raw faint)"])
    assert {"sampled (train)", "held-out greedy"} <= set(panels["accuracy"])
    assert {"mean", "max"} <= set(panels["completion length"])
    assert {"KL to reference", "entropy"} <= set(panels["policy: KL (k3) and entropy"])
    a, b = write_rl_run(tmp_path / "a", seed=1), write_rl_run(tmp_path / "b", seed=2)
    plot.plot_runs([a, b], tmp_path / "cmp", ["lr1e-4", "lr3e-4"])  # overlaid: one colour per run
    assert {"lr1e-4: held-out greedy", "lr3e-4: held-out greedy"} <= set(drawn["rl.png"]["accuracy"])
    with pytest.raises(ValueError, match="cannot overlay GRPO runs"):
        plot.plot_runs([a, write_run(tmp_path / "lm", steps=20)], tmp_path / "mixed")


def test_heldout_line_is_not_a_resume():
    """GRPO writes its held-out accuracy after the train line of the same step: both are kept (not
    taken for a resume that redid the step); a real resume still drops the lines it redid."""
    rows = [{"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.2}, {"step": 2, "heldout_accuracy": 0.3}]
    assert plot.drop_superseded(rows) == rows
    resumed = rows + [{"step": 2, "reward_mean": 0.25}, {"step": 2, "heldout_accuracy": 0.35}]
    assert plot.drop_superseded(resumed) == [rows[0], *resumed[3:]]
