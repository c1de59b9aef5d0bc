import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train import metrics as metrics_lib

REPO = Path(__file__).resolve().parents[2]


def _write_run(workdir, n_steps=6, n_layers=2, n_experts=4):
    w = metrics_lib.MetricWriter(workdir, total_steps=n_steps, console=True)
    rng = np.random.default_rng(0)
    for step in range(1, n_steps + 1):
        load = rng.dirichlet(np.ones(n_experts), size=n_layers)
        w.write(step, {"loss": jnp.float32(3.0 / step), "main_loss": np.float32(2.5 / step),
                       "mtp_loss": 2.8 / step, "balance_loss": jnp.asarray(1e-3), "lr": 1e-3,
                       "grad_norm": jnp.bfloat16(0.5), "tokens_per_sec": 1234.5, "skipped_steps": np.int32(0),
                       "maxvio": jnp.asarray(load.max(-1) * n_experts - 1.0), "expert_load": load})
        if step % 3 == 0:
            w.write(step, {"eval_loss": 2.0, "eval_perplexity": math.exp(2.0), "eval_bits_per_byte": float("nan")})
    w.log("hello")
    w.close()


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    _write_run(tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    first = lines[0]
    assert first["step"] == 1 and isinstance(first["loss"], float) and first["loss"] == pytest.approx(3.0)
    assert first["skipped_steps"] == 0 and isinstance(first["skipped_steps"], int)
    assert first["grad_norm"] == 0.5
    assert len(first["maxvio"]) == 2 and len(first["expert_load"]) == 2 and len(first["expert_load"][0]) == 4
    ev = lines[3]
    assert ev["step"] == 3 and ev["eval_loss"] == 2.0 and ev["eval_bits_per_byte"] is None  # NaN -> null
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_appends_across_writers(tmp_path):
    for step in (1, 2):
        w = metrics_lib.MetricWriter(tmp_path, total_steps=2, enable_tensorboard=False, console=False)
        w.write(step, {"loss": float("inf")})
        w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[0]["loss"] is None


def test_run_info_and_summary(tmp_path):
    cfg = ml_collections.ConfigDict({"model": {"d_model": 8, "q_lora_rank": None}, "seed": 0})
    info = metrics_lib.write_run_info(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert run_info == json.loads(json.dumps(info))
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "python"):
        assert run_info["packages"][pkg]
    assert run_info["git_revision"]  # a sha, or "unknown" outside a git checkout
    assert metrics_lib.git_revision(tmp_path) == "unknown"
    metrics_lib.write_summary(tmp_path, {"final_loss": jnp.float32(1.5), "steps": 10, "nan": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 1.5, "steps": 10, "nan": None}


def test_plot_smoke(tmp_path):
    from tools import plot
    _write_run(tmp_path, n_steps=8)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 9, "loss": 1.')  # torn line of a killed run
    out = tmp_path / "plots"
    paths = plot.plot_workdir(tmp_path, out, logy=True)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png"]
    for p in paths:
        assert p.parent == out and p.stat().st_size > 1000


def test_plot_cli_errors_without_metrics(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.plot", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "metrics.jsonl" in r.stderr
