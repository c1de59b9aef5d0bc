"""``train.tracker``: TensorBoard and wandb (offline) receive the scalars of every metrics.jsonl line;
``train.log_expert_load_every`` thins the per-layer loads."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_metrics import _write_run
from train import metrics as metrics_lib
from train import tracker


def _jsonl_scalars(workdir) -> list[tuple[int, dict]]:
    lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], tracker.scalars(l)) for l in lines]


def _same(a: dict, b: dict) -> bool:
    """Equal keys and values (float32 round trip; NaN equals NaN)."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-6) for k in a
    )


def test_parse():
    assert tracker.parse("none") == () and tracker.parse("tensorboard") == ("tensorboard",)
    assert tracker.parse("wandb, tensorboard") == ("wandb", "tensorboard")
    for bad in ("tensorbord", "", "none,wandb"):
        with pytest.raises(ValueError, match="train.tracker="):
            tracker.parse(bad)
    line = {"step": 3, "loss": 1.5, "maxvio": [0.5, None], "expert_load": [[0.5, 0.5]], "note": "x"}
    out = tracker.scalars(line)
    assert out.keys() == {"loss", "maxvio/0", "maxvio/1"} and out["loss"] == 1.5 and math.isnan(out["maxvio/1"])


def test_tensorboard_receives_the_jsonl_scalars(tmp_path):
    from tensorboardX.proto import event_pb2

    _write_run(tmp_path, tracker="tensorboard")
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    raw, got = events.read_bytes(), {}
    while raw:
        (n,) = struct.unpack("Q", raw[:8])
        ev = event_pb2.Event.FromString(raw[12 : 12 + n])
        raw = raw[16 + n :]
        for v in ev.summary.value:
            got.setdefault(ev.step, {})[v.tag] = v.simple_value
    want = {}
    for step, s in _jsonl_scalars(tmp_path):
        want.setdefault(step, {}).update(s)
    assert got.keys() == want.keys() and all(_same(got[s], want[s]) for s in want)
    assert "maxvio/1" in got[1] and "eval_loss" in got[3]


def _wandb_records(path: Path):
    """The protobuf records of a wandb ``.wandb`` file: a 7-byte header, then LevelDB log blocks."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        n, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if left < 7 or kind == 0:  # the rest of the block is padding
            pos += left
            continue
        buf += raw[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST
            yield buf
            buf = b""


def test_wandb_offline_receives_the_jsonl_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # an optional dependency: pip install wandb
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write_run(tmp_path, tracker="wandb")
    # wandb's service may still be writing the run file after run.finish(); it is complete once the
    # service is torn down (at interpreter exit, for a trainer process).
    wandb.teardown()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    got = []
    for data in _wandb_records(run_file):
        rec = wandb_internal_pb2.Record.FromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            got.append((row.pop("step"), {k: v for k, v in row.items() if not k.startswith("_")}))
    want = _jsonl_scalars(tmp_path)
    assert [s for s, _ in got] == [s for s, _ in want] and len(want) == 8
    assert all(_same(g, w) for (_, g), (_, w) in zip(got, want))
    run_id = (tmp_path / tracker.WANDB_ID_FILE).read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"


def test_expert_load_every_n_steps_and_at_the_last(tmp_path):
    w = metrics_lib.MetricWriter(tmp_path, total_steps=8, per_layer_every=3, console=False)
    for step in range(1, 9):
        w.write(step, {"loss": 1.0, "maxvio": np.ones(2), "expert_load": np.full((2, 4), 0.25)})
    w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "expert_load" in l] == [3, 6, 8]
    assert all("maxvio" in l and "loss" in l for l in lines)
    with pytest.raises(ValueError, match="log_expert_load_every"):
        metrics_lib.MetricWriter(tmp_path, total_steps=8, per_layer_every=0)


def test_trainer_profiles_the_steps_and_thins_expert_load(tmp_path):
    """train.profile_steps writes a jax.profiler trace; train.log_expert_load_every and train.tracker
    reach the writer from the config."""
    from tests.train.test_trainer import tiny
    from train.trainer import train_and_evaluate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "moe", "expert"], 120)) + "\n")
    config = tiny(
        str(corpus / "*.txt"),
        steps=3,
        checkpoint_every=3,
        async_checkpoint=False,
        profile_steps="1:2",
        log_expert_load_every=2,
        tracker="tensorboard",
    )
    config.model.mtp_depth = 0  # compile time
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir))
    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("perfetto_trace.json.gz"))  # for ui.perfetto.dev
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "expert_load" in l] == [2, 3]  # every 2nd step and the last
    assert [l["step"] for l in lines if "maxvio" in l] == [1, 2, 3]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_bad_profile_steps_are_refused():
    from train.profiler import parse_steps

    assert parse_steps(None) is None and parse_steps("10:15") == (10, 15)
    for bad in ("10", "15:10", "a:b", "-1:3"):
        with pytest.raises(ValueError, match="train.profile_steps="):
            parse_steps(bad)
