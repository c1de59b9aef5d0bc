"""``python -m train.main`` on bad input: one line on stderr, exit status 1, nothing created."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _main(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "train.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )


def test_missing_config_file_is_one_line_and_creates_nothing(tmp_path):
    r = _main("--config=configs/mistyped.py", f"--workdir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: cannot read --config=configs/mistyped.py: [Errno 2] No such file or directory: 'configs/mistyped.py'"
    ]
    assert list(tmp_path.iterdir()) == []


def test_bad_config_value_is_one_line_and_creates_nothing(tmp_path):
    r = _main(
        f"--config={REPO}/configs/moe_tiny.py", "--config.train.eval_every=0", f"--workdir={tmp_path}/run", cwd=tmp_path
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: ValueError: train.eval_every must be >= 1, got 0"
    assert list(tmp_path.iterdir()) == []
