"""End-to-end trainer behaviour on a tiny model and tiny data: preemption, divergence, corruption, bad input.

Kill-and-resume at five points: ``test_faults.py``; workdir locking: ``test_workdir.py``."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs.base import build
from model.config import ModelConfig
from tests.util import TINY
from train.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointError
from train.optimizer import make_optimizer
from train.state import abstract_state
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
    c.train.update(
        dict(
            steps=6,
            global_batch_size=4,
            eval_every=100,
            eval_batches=1,
            checkpoint_every=3,
            tracker="none",
            progress=False,
            peak_flops=1e12,
            async_checkpoint=True,
        )
    )
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(corpus, tmp_path, monkeypatch, sig):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) both save the current step and return."""
    monkeypatch.chdir(tmp_path)
    wd = "run"  # relative, like train.main's default workdir

    def preempt(step):
        if step == 2:
            os.kill(os.getpid(), sig)

    cfg = tiny(corpus, checkpoint_every=100)
    summary = train_and_evaluate(cfg, wd, on_step=preempt)
    assert summary["preempted"] and summary["steps"] == 2
    # The checkpoint holds step 2 (the state's own counter, not only the directory name).
    ck = Checkpointer(os.path.join(tmp_path, wd, "checkpoints"), save_every=1, read_only=True)
    _, abstract = abstract_state(
        ModelConfig.from_dict(cfg.model.to_dict()), make_optimizer(cfg.optimizer, cfg.train.steps), cfg.train.seed
    )
    step, state, _, _ = ck.restore(abstract, expected_model=ModelConfig.from_dict(cfg.model.to_dict()).identity())
    assert step == 2 and int(state["step"]) == 2
    ck.close()


def test_non_finite_streak_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    """The update of step 3 diverges (its own loss was finite): steps 4, 5, 6 are non-finite."""
    import jax
    import jax.numpy as jnp

    from train import trainer

    real = trainer.sharded_train_step

    def diverging(*args, **kw):
        step_fn = real(*args, **kw)

        def run(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state["step"]) == 3:
                state = {**state, "params": jax.tree.map(lambda x: x * jnp.inf, state["params"])}
            return state, metrics

        run.lower = step_fn.lower  # the trainer compiles the step ahead (train/memory.py)
        return run

    monkeypatch.setattr(trainer, "sharded_train_step", diverging)
    wd = str(tmp_path / "run")
    cfg = tiny(corpus, checkpoint_every=1, keep_checkpoints=1, max_nonfinite_steps=3, steps=20)
    with pytest.raises(
        NonFiniteError,
        match=r"3 consecutive non-finite steps \(last: 6\).*last good checkpoint "
        r"is step 2 .*step 3 holds the state the non-finite steps started",
    ):
        train_and_evaluate(cfg, wd)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert rows[-1]["step"] == 6 and rows[-1]["skipped_steps"] == 3
    # Nothing saved during the streak (4, 5, 6); 2 survives keep_checkpoints=1 because it is the good one.
    assert sorted(int(p) for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit()) == [2, 3]


def test_nonsense_values_are_refused(corpus, tmp_path):
    for section, field, value, msg in [
        ("optimizer", "lr", -1e-3, "optimizer.lr must be a finite number >= 0"),
        ("optimizer", "b2", 1.0, "optimizer.b2 must be in"),
        ("train", "keep_checkpoints", 0, "train.keep_checkpoints must be >= 1"),
        ("train", "max_nonfinite_steps", 0, "train.max_nonfinite_steps must be >= 1"),
    ]:
        cfg = tiny(corpus)
        cfg[section][field] = value
        with pytest.raises(ValueError, match=msg):
            train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before creating anything


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
    _truncate_arrays(os.path.join(wd, "checkpoints", "4"))
    with pytest.raises(CorruptCheckpointError, match="4"):
        train_and_evaluate(tiny(corpus, steps=6, checkpoint_every=2), wd)
    ran = []
    summary = train_and_evaluate(
        tiny(corpus, steps=6, checkpoint_every=2, restore_fallback=True), wd, on_step=ran.append
    )
    assert summary["steps"] == 6 and ran == [3, 4, 5, 6]  # resumed after step 2, not from scratch
    # Every checkpoint corrupt: the fallback quarantines them all and stops; the next run refuses to
    # start from scratch over them (it used to train from step 1 silently) unless told to.
    for step in (2, 4, 6):
        _truncate_arrays(os.path.join(wd, "checkpoints", str(step)))
    fallback = tiny(corpus, steps=6, checkpoint_every=2, restore_fallback=True)
    with pytest.raises(CorruptCheckpointError, match="No restorable checkpoint"):
        train_and_evaluate(fallback, wd)
    with pytest.raises(CorruptCheckpointError, match="refusing to start from scratch.*start_from_scratch=True"):
        train_and_evaluate(fallback, wd)
    names = os.listdir(os.path.join(wd, "checkpoints"))
    assert {p.split(".")[0] for p in names} == {"2", "4", "6"} and all(".corrupt-" in p for p in names)


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.truncate(8)


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
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--config=configs/moe_tiny.py",
            "--config.train.stepz=3",
            f"--workdir={tmp_path}/x",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "stepz" in r.stderr
