"""End-to-end trainer behaviour on a tiny model and tiny data: resume, preemption, bad input."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs.base import build
from tests.util import TINY
from train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
from train.trainer import NonFiniteError, train_and_evaluate

TINY_MODEL = {**TINY, **dict(vocab_size=264, n_layers=2, q_lora_rank=16, n_routed_experts=4, n_group=2, topk_group=1)}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "moe", "latent", "router", "expert"]
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 120)) + "\n")
    return str(d / "*.txt")


def tiny(corpus, **train):
    c = build("moe_tiny")
    for k, v in TINY_MODEL.items():
        setattr(c.model, k, v)
    c.data.source = corpus
    c.data.seq_len = 32
    c.data.val_percent = 20
    c.train.update(dict(steps=6, global_batch_size=4, eval_every=100, eval_batches=1, checkpoint_every=3,
                        tensorboard=False, progress=False, peak_flops=1e12, async_checkpoint=True))
    c.train.update(train)
    c.optimizer.warmup_steps = 2
    return c


def losses(workdir):
    """step -> loss, the last line written for each step (a resumed run rewrites the steps it redoes)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


def test_kill_and_resume_is_bitwise_identical(corpus, tmp_path):
    full = str(tmp_path / "full")
    train_and_evaluate(tiny(corpus), full)

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint

    killed = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny(corpus), killed, on_step=crash)
    summary = train_and_evaluate(tiny(corpus), killed)  # same workdir: resumes from step 3
    assert summary["steps"] == 6
    a, b = losses(full), losses(killed)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bitwise on CPU
    s = json.load(open(os.path.join(killed, "summary.json")))
    for key in ("steps", "final_eval_loss", "final_eval_bits_per_byte", "unigram_bits_per_byte", "tokens_per_second"):
        assert key in s


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wd = "run"  # relative, like train.main's default workdir

    def preempt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train_and_evaluate(tiny(corpus, checkpoint_every=100), wd, on_step=preempt)
    assert summary["preempted"] and summary["steps"] == 2
    assert os.path.isdir(os.path.join(tmp_path, wd, "checkpoints", "2"))


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path):
    wd = str(tmp_path / "run")
    cfg = tiny(corpus, checkpoint_every=1, max_nonfinite_steps=3, steps=20)
    cfg.optimizer.lr = 1e30  # the first update overflows the weights: every later loss is inf/nan
    cfg.optimizer.warmup_steps = 0
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        train_and_evaluate(cfg, wd)
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert rows[-1]["skipped_steps"] == 3
    # the last checkpoint is a finite state and restores
    steps = sorted(int(p) for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit())
    assert steps and steps[-1] <= 4


def test_refuses_workdir_of_a_different_model(corpus, tmp_path):
    wd = str(tmp_path / "run")
    train_and_evaluate(tiny(corpus, steps=3), wd)
    ckpt = os.path.join(wd, "checkpoints")
    before = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}
    other = tiny(corpus, steps=6)
    other.model.d_model = 48
    with pytest.raises(CheckpointMismatchError, match="d_model"):
        train_and_evaluate(other, wd)
    assert {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)} == before


def test_corrupt_latest_checkpoint(corpus, tmp_path):
    wd = str(tmp_path / "run")
    train_and_evaluate(tiny(corpus, steps=4, checkpoint_every=2), wd)
    latest = os.path.join(wd, "checkpoints", "4", "state")
    for root, _, files in os.walk(latest):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.truncate(8)
    with pytest.raises(CorruptCheckpointError, match="4"):
        train_and_evaluate(tiny(corpus, steps=6, checkpoint_every=2), wd)
    summary = train_and_evaluate(tiny(corpus, steps=6, checkpoint_every=2, restore_fallback=True), wd)
    assert summary["steps"] == 6


def test_bad_data_and_vocab_errors(corpus, tmp_path):
    cfg = tiny(corpus)
    cfg.data.source = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(ValueError, match="missing"):
        train_and_evaluate(cfg, str(tmp_path / "a"))
    cfg = tiny(corpus)
    cfg.model.vocab_size = 100  # the byte tokenizer has 259 ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_and_evaluate(cfg, str(tmp_path / "b"))


def test_unknown_config_key_fails_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.main", "--config=configs/moe_tiny.py",
                        "--config.train.stepz=3", f"--workdir={tmp_path}/x"], capture_output=True, text=True)
    assert r.returncode != 0 and "stepz" in r.stderr
