import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.train.fake_gcs import fake_gcs
from train import metrics as metrics_lib
from train import provenance

REPO = Path(__file__).resolve().parents[2]


def _write_run(workdir, n_steps=6, n_layers=2, n_experts=4, start_step=0, scale=3.0, **writer):
    writer = {"tracker": "tensorboard", **writer}
    w = metrics_lib.MetricWriter(workdir, total_steps=n_steps, console=True, start_step=start_step, **writer)
    rng = np.random.default_rng(0)
    for step in range(start_step + 1, n_steps + 1):
        load = rng.dirichlet(np.ones(n_experts), size=n_layers)
        w.write(
            step,
            {
                "loss": jnp.float32(scale / step),
                "main_loss": np.float32(2.5 / step),
                "mtp_loss": 2.8 / step,
                "balance_loss": jnp.asarray(1e-3),
                "lr": 1e-3,
                "grad_norm": jnp.bfloat16(0.5),
                "tokens_per_sec": 1234.5,
                "skipped_steps": np.int32(0),
                "maxvio": jnp.asarray(load.max(-1) * n_experts - 1.0),
                "expert_load": load,
            },
        )
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
        w = metrics_lib.MetricWriter(tmp_path, total_steps=2, start_step=step - 1, console=False)
        w.write(step, {"loss": float("inf")})
        w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[0]["loss"] is None


def test_run_info_and_summary(tmp_path):
    cfg = ml_collections.ConfigDict({"model": {"d_model": 8, "q_lora_rank": None}, "seed": 0})
    info = provenance.write_run_info(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert run_info == {**json.loads(json.dumps(info)), "resumes": []}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "python"):
        assert run_info["packages"][pkg]
    assert run_info["git_revision"]  # a sha, or "unknown" outside a git checkout
    assert provenance.git_revision(tmp_path) == "unknown"
    provenance.write_summary(tmp_path, {"final_loss": jnp.float32(1.5), "steps": 10, "nan": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 1.5, "steps": 10, "nan": None}
    assert provenance.read_summary(tmp_path)["steps"] == 10


def test_resume_keeps_first_provenance_and_appends_history(tmp_path):
    first = ml_collections.ConfigDict({"optimizer": {"lr": 1e-3}, "train": {"steps": 10}})
    provenance.write_run_info(tmp_path, first)
    started = json.loads((tmp_path / "run_info.json").read_text())["started"]
    later = ml_collections.ConfigDict({"optimizer": {"lr": 5e-4}, "train": {"steps": 20, "new_field": 1}})
    changes = provenance.config_changes(first.to_dict(), later.to_dict())
    assert changes == {"optimizer.lr": [1e-3, 5e-4], "train.steps": [10, 20], "train.new_field": ["<absent>", 1]}
    assert provenance.format_changes({"optimizer.lr": [1e-3, 5e-4]}) == "optimizer.lr: 0.001 -> 0.0005"
    provenance.write_run_info(tmp_path, later, start_step=4, changes=changes, superseded_lines=3)
    provenance.write_run_info(tmp_path, later, start_step=8, changes={})
    assert json.loads((tmp_path / "config.json").read_text()) == first.to_dict()  # the first run's, kept
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert run_info["started"] == started
    assert [(r["from_step"], r["config_changes"], r["superseded_metric_lines"]) for r in run_info["resumes"]] == [
        (4, json.loads(json.dumps(changes)), 3),
        (8, {}, 0),
    ]


def tb_events(files: list[bytes]):
    """(step, is a purge marker) of every event in the given TensorBoard event files' bytes."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for raw in files:
        while raw:
            (n,) = struct.unpack("Q", raw[:8])
            ev = event_pb2.Event.FromString(raw[12 : 12 + n])
            raw = raw[16 + n :]
            out.append((ev.step, ev.HasField("session_log") and ev.session_log.status == ev.session_log.START))
    return out


def test_resume_supersedes_orphaned_lines(tmp_path, monkeypatch):
    import tensorboardX.event_file_writer as efw

    monkeypatch.setattr(efw.time, "time", lambda: 1.7e9)  # both writers start "in the same second"
    _write_run(tmp_path, n_steps=6)  # steps 1-6, evals at 3 and 6; its last checkpoint was step 3
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 7, "loss": 1.')  # torn line of the kill
    before = (tmp_path / "metrics.jsonl").read_text().splitlines()
    _write_run(tmp_path, n_steps=8, start_step=3, scale=5.0)  # the resumed run redoes 4-8
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    assert [r["loss"] for r in rows if "loss" in r][3:] == pytest.approx([5.0 / s for s in (4, 5, 6, 7, 8)])
    # nothing lost: the orphaned lines (steps 4-6 and the torn one), in order, in the superseded file
    assert (tmp_path / "metrics.superseded.jsonl").read_text().splitlines() == before[4:]
    # TensorBoard: both runs' event files are kept, the resumed one starts with a purge marker at step 4
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = tb_events([f.read_bytes() for f in files])
    assert (4, True) in events and sum(step == 6 for step, _ in events) >= 2


def test_plot_never_runs_back_in_time(tmp_path):
    from tools import plot

    # an old-style metrics.jsonl: killed after step 6 (checkpoint 3), resumed, killed after 5, resumed from 3 again
    lines = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 9.0}]
    lines += (
        [{"step": s, "loss": 1.0 / s} for s in (4, 5, 6)]
        + [{"step": s, "loss": 2.0 / s} for s in (4, 5)]
        + [{"step": s, "loss": 3.0 / s} for s in (4, 5, 6, 7)]
    )
    lines += [{"step": 7, "eval_loss": 8.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    rows = plot.read_metrics(tmp_path)
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows] == [
        (1, 1.0, None),
        (2, 0.5, None),
        (3, 1 / 3, None),
        (3, None, 9.0),
        (4, 0.75, None),
        (5, 0.6, None),
        (6, 0.5, None),
        (7, 3 / 7, None),
        (7, None, 8.0),
    ]
    steps, _ = plot._series(rows, "loss")
    assert np.all(np.diff(steps) > 0)


def test_remote_workdir_writes_through_epath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "gs://bucket/runs/r1"
    with fake_gcs() as fs:
        _write_run(url, n_steps=6)
        _write_run(url, n_steps=8, start_step=3)
        provenance.write_run_info(url, ml_collections.ConfigDict({"seed": 0}))
        provenance.write_summary(url, {"steps": 8})
        from tools import plot

        paths = plot.plot_workdir(url, logy=False)
        assert sorted(str(p) for p in paths) == [f"{url}/expert_load.png", f"{url}/loss.png"]
        files = set(fs.find("bucket/runs/r1"))
        rows = [json.loads(l) for l in fs.cat_file(f"{url}/metrics.jsonl").decode().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    for name in (
        "metrics.jsonl",
        "metrics.superseded.jsonl",
        "config.json",
        "run_info.json",
        "summary.json",
        "loss.png",
        "expert_load.png",
    ):
        assert f"bucket/runs/r1/{name}" in files
    assert sum(f.startswith("bucket/runs/r1/tb/events.out.tfevents.") for f in files) == 2
    assert list(tmp_path.iterdir()) == []  # no local folder "gs:" (or anything else)


def test_plot_smoke(tmp_path):
    from tools import plot

    _write_run(tmp_path, n_steps=8)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 9, "loss": 1.')  # torn line of a killed run
    out = tmp_path / "plots"
    paths = plot.plot_workdir(tmp_path, out, logy=True)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png"]
    for p in paths:
        assert Path(p).parent == out and Path(p).stat().st_size > 1000


def test_plot_cli_errors_without_metrics(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tools.plot", f"--workdir={tmp_path}/mistyped", f"--out={tmp_path}/plots"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # neither the mistyped input nor the output folder created
