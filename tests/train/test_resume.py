"""A run in a remote workdir (gs://, served from memory), killed, resumed with a changed config, rerun.

Checks issue #11 items 8-10 end to end: nothing local is created for a ``gs://`` workdir (data,
metrics, TensorBoard, provenance and summary all go through ``etils.epath``); a resume takes the
interrupted run's lines after the checkpoint out of metrics.jsonl (kept aside), purges them from
TensorBoard, announces and records the changed config fields; rerunning the finished run changes
nothing. Orbax writes arrays to ``gs://`` with tensorstore's own GCS client, which no fake fsspec
filesystem reaches, so here the checkpoint directory alone is mapped to a local folder.
"""

import json

import numpy as np
import pytest

from tests.train.fake_gcs import fake_gcs
from tests.train.test_metrics import tb_events
from tests.train.test_trainer import tiny
from train import trainer
from train.checkpoint import Checkpointer

URL = "gs://bucket/run"


def test_remote_workdir_kill_resume_with_changes_then_rerun(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    local_ckpt = tmp_path / "checkpoints"

    class LocalArrays(Checkpointer):
        def __init__(self, directory, **kw):
            assert str(directory) == f"{URL}/checkpoints"
            super().__init__(local_ckpt, **kw)

    monkeypatch.setattr(trainer, "Checkpointer", LocalArrays)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "moe", "latent", "router", "expert"]
    with fake_gcs() as fs:
        for i in range(12):
            fs.pipe_file(f"bucket/corpus/doc{i:02d}.txt", (" ".join(rng.choice(words, 120)) + "\n").encode())
        cfg = tiny("gs://bucket/corpus/*.txt", steps=5, checkpoint_every=2, tracker="tensorboard")

        def crash(step):
            if step == 4:
                raise KeyboardInterrupt  # steps 3 and 4 logged, the newest checkpoint is step 2

        with pytest.raises(KeyboardInterrupt):
            trainer.train_and_evaluate(cfg, URL, on_step=crash)
        first_info = fs.cat_file(f"{URL}/run_info.json")
        resumed = tiny("gs://bucket/corpus/*.txt", steps=5, checkpoint_every=2, tracker="tensorboard")
        resumed.optimizer.lr = cfg.optimizer.lr / 2
        summary = trainer.train_and_evaluate(resumed, URL)
        assert "optimizer.lr: 0.003 -> 0.0015" in capsys.readouterr().out

        rows = [json.loads(line) for line in fs.cat_file(f"{URL}/metrics.jsonl").decode().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5] and "eval_loss" in rows[-1]
        moved = [json.loads(line) for line in fs.cat_file(f"{URL}/metrics.superseded.jsonl").decode().splitlines()]
        assert [r["step"] for r in moved] == [3, 4]
        assert (3, True) in tb_events(
            [fs.cat_file(f) for f in sorted(fs.find(f"{URL}/tb"))]
        )  # TensorBoard's purge marker for the orphaned 3, 4
        info = json.loads(fs.cat_file(f"{URL}/run_info.json"))
        assert {k: v for k, v in info.items() if k != "resumes"} == {
            k: v for k, v in json.loads(first_info).items() if k != "resumes"
        }  # the first start's, kept
        [entry] = info["resumes"]
        assert entry["from_step"] == 2 and entry["superseded_metric_lines"] == 2
        assert entry["config_changes"] == {"optimizer.lr": [cfg.optimizer.lr, resumed.optimizer.lr]}
        assert json.loads(fs.cat_file(f"{URL}/summary.json"))["tokens_per_second"] is not None

        before = {f: fs.cat_file(f) for f in fs.find("bucket/run")}
        again = trainer.train_and_evaluate(resumed, URL)  # finished: says so, changes nothing
        assert "nothing to do, nothing changed" in capsys.readouterr().out
        assert {f: fs.cat_file(f) for f in fs.find("bucket/run")} == before
        assert again == json.loads(before["bucket/run/summary.json"]) == json.loads(json.dumps(summary))
    assert list(cwd.iterdir()) == []  # no local folder "gs:"
