"""Fault injection: SIGKILL the trainer at five points, resume each time, and get the uninterrupted
run's losses bit for bit.

One workdir, one chain of trainer processes (``fault_driver.py``), each killed at its own point
and resumed by the next: inside an async save (items half written), during garbage collection
(a step half deleted), inside the preemption save after SIGTERM, between a save's last write and
its commit, and during the restore's verification. The last process trains to the end. Every
loss and the final eval loss equal those of one uninterrupted process, and every resume starts
right after the checkpoint it names (a silent restart from step 0 would fail this, although it
gives the same losses). The processes share a persistent compilation cache, so only the
uninterrupted reference compiles (or finds them in the test session's cache).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.train.test_checkpoint import disk_full_at  # noqa: F401 -- a fixture
from tests.train.test_trainer import corpus, losses, tiny  # noqa: F401 -- corpus is a fixture
from train.checkpoint import CheckpointWriteError
from train.trainer import train_and_evaluate

# (kill point, checkpoint it resumes from (None: fresh start), killed by SIGKILL)
CHAIN = [
    ("save:4", None, True),  # ckpt 2 committed; dies writing 4 -> a tmp dir, never committed
    ("gc:2", 2, True),  # 4 committed; dies deleting 2 at save(6) -> 2 uncommitted and partial
    ("sigterm:5+save:5", 4, True),  # preempted at 5; dies inside the preemption save
    ("commit:6", 4, True),  # 6 fully written, dies before its commit
    ("restore", None, True),  # dies verifying checkpoint 4, before saying it resumed
    ("none", 4, False),  # trains 5..8 to the end
]


def _run(workdir, corpus, point, cache):  # noqa: F811
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.run(
        [sys.executable, "-m", "tests.train.fault_driver", str(workdir), corpus, point],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_sigkill_at_five_points_resumes_bitwise(corpus, tmp_path):  # noqa: F811
    # The session's cache (tests/conftest.py) when there is one: the reference may find the tiny
    # model's step compiled by another test already.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path / "jax_cache"
    ref = _run(tmp_path / "ref", corpus, "none", cache)
    assert ref.returncode == 0, ref.stderr[-3000:]
    wd = tmp_path / "chain"
    for point, resumed_from, killed in CHAIN:
        r = _run(wd, corpus, point, cache)
        assert r.returncode == (-signal.SIGKILL if killed else 0), (point, r.stderr[-3000:])
        resumed = re.findall(r"Resumed from .*/checkpoints/(\d+)", r.stdout)
        assert resumed == ([] if resumed_from is None else [str(resumed_from)]), (point, r.stdout)
        if point != "restore":  # the restore kill dies before any step
            first = int(re.search(r"FIRST_STEP (\d+)", r.stdout).group(1))
            assert first == (resumed_from or 0) + 1, (point, r.stdout)
    want, got = losses(tmp_path / "ref"), losses(wd)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]  # bitwise: CPU is deterministic
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_eval_loss"] == ref_summary["final_eval_loss"]
    steps = sorted(n for n in os.listdir(wd / "checkpoints") if n.isdigit())
    assert steps == ["8"]  # keep_checkpoints=1; the half-deleted 2 and the uncommitted saves are gone
    assert not [n for n in os.listdir(wd / "checkpoints") if "corrupt" in n]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_disk_full_stops_the_run_at_the_failing_save(corpus, tmp_path, disk_full_at, capfd):  # noqa: F811
    """The save of step 4 fails in the background (ENOSPC): the run stops at the next step's poll with
    one line, instead of running on to the next save (step 6) and printing orbax's thread tracebacks."""
    disk_full_at.add(4)
    ran = []

    def on_step(step):
        ran.append(step)
        if step == 5:
            time.sleep(2)  # let the background save of step 4 fail before step 6 polls it

    wd = tmp_path / "run"
    with pytest.raises(
        CheckpointWriteError,
        match=r"^saving checkpoint step 4 to .*failed: .*No space left on "
        r"device.*newest: 2\)$",
    ) as e:
        train_and_evaluate(tiny(corpus, steps=8, checkpoint_every=2), str(wd), on_step=on_step)
    assert ran in ([1, 2, 3, 4], [1, 2, 3, 4, 5]) and "\n" not in str(e.value)  # stopped before step 6
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(n for n in os.listdir(wd / "checkpoints") if n.isdigit()) == ["2"]
