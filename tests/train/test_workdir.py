"""One trainer per workdir (train/workdir.py), and workdirs that cannot be used fail at once."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train.test_trainer import corpus, tiny  # noqa: F401 -- corpus is a fixture
from train import workdir
from train.trainer import train_and_evaluate

_HOLD = (
    "import sys, time; from train.workdir import lock; held = lock(sys.argv[1]); "
    "print('held', flush=True); time.sleep(120)"
)


def _holder(path):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_trainer_fails_at_once_naming_the_holder(corpus, tmp_path):  # noqa: F811
    wd = tmp_path / "run"
    first = _holder(wd)  # a trainer of another process holds the workdir
    try:
        t0 = time.monotonic()
        with pytest.raises(workdir.WorkdirLockedError, match=rf"in use by pid {first.pid} on host .*one trainer"):
            train_and_evaluate(tiny(corpus), str(wd))
        assert time.monotonic() - t0 < 30  # before any compilation
        assert sorted(os.listdir(wd)) == ["LOCK"]  # wrote nothing: no metrics, config, checkpoints
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with workdir.lock(wd) as held:  # the kernel dropped the dead holder's lock: never stale
        assert json.loads((wd / "LOCK").read_text())["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()}"):
            workdir.lock(wd)  # the same process opening it twice is refused too
    held.release()


def test_lease_lock_for_object_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir, "_LEASE_SETTLE_S", 0.0)
    path = tmp_path / "LOCK"
    a = workdir._LeaseLock(path)
    with pytest.raises(workdir.WorkdirLockedError, match=rf"pid {os.getpid()} .*lease renewed"):
        workdir._LeaseLock(path)
    a.release()
    assert not path.exists()
    stale = dict(json.loads(json.dumps(workdir._holder_record("dead"))), heartbeat=time.time() - 1e4)
    path.write_text(json.dumps(stale))  # a holder that died without releasing
    b = workdir._LeaseLock(path)  # taken over
    assert json.loads(path.read_text())["token"] != "dead"
    b.release()


def test_unusable_workdir_fails_at_once_in_one_line(corpus, tmp_path):  # noqa: F811
    (tmp_path / "afile").write_text("x")
    for wd, msg in (
        (tmp_path / "afile", "is a file, not a directory"),
        (tmp_path / "afile" / "run", "a parent is a file"),
    ):
        with pytest.raises(workdir.WorkdirError, match=msg) as e:
            train_and_evaluate(tiny(corpus), str(wd))
        assert "\n" not in str(e.value)


def _read_only_command(path, argv):
    """``argv`` run with ``path`` read-only (root ignores permission bits: a read-only bind mount)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return argv
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], check=False).returncode != 0:
        pytest.skip("running as root without user namespaces: no way to make a read-only directory")
    quoted = " ".join(f"'{a}'" for a in argv)
    return [
        "unshare",
        "-rm",
        "sh",
        "-c",
        f"mount --bind {path} {path} && mount -o remount,bind,ro {path} && exec {quoted}",
    ]


def test_read_only_checkpoint_dir_fails_within_seconds(corpus, tmp_path):  # noqa: F811
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    script = (
        "import sys; from tests.train.test_trainer import tiny; from train.trainer import train_and_evaluate; "
        "train_and_evaluate(tiny(sys.argv[1]), sys.argv[2])"
    )
    cmd = _read_only_command(wd / "checkpoints", [sys.executable, "-c", script, corpus, str(wd)])
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=os.getcwd(), check=False)
    assert r.returncode != 0 and time.monotonic() - t0 < 60  # not orbax's 300 s barrier
    assert re.search(
        rf"WorkdirError: checkpoint directory {wd}/checkpoints is not writable: "
        r"(Read-only file system|Permission denied)\n",
        r.stderr,
    ), r.stderr[-2000:]
