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


def test_misspelled_field_or_bad_value_is_one_line(tmp_path):
    for arg, line in (
        (
            "--config.train.stepz=5",
            "error: --config.train.stepz: the config has no field 'stepz' (did you mean \"steps\"?)",
        ),
        ("--config.optimizr.lr=1", "error: --config.optimizr.lr: the config has no field 'optimizr'"),
        ("--config.train.steps=abc", "error: flag --config.train.steps=abc: invalid literal for int() with base 10"),
    ):
        r = _main(f"--config={REPO}/configs/moe_tiny.py", arg, f"--workdir={tmp_path}/run", cwd=tmp_path)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(line), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_print_config_and_help(tmp_path):
    r = _main(f"--config={REPO}/configs/moe_tiny.py", "--config.train.steps=7", "--print_config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = lines.index("train.steps = 7")  # the override applied, in the spelling --config.* takes
    assert lines[i - 1] == "# Optimizer steps to run."
    assert "optimizer.lr = 0.006" in lines and "model.d_model = 128" in lines
    assert lines[lines.index("model.d_model = 128") - 1] == "# d (hidden_size)"
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing run
    h = _main("--help", cwd=tmp_path)
    assert "--print_config" in h.stdout and "--print_config`` prints the resolved config" in h.stdout


def test_every_run_field_has_a_comment():
    from configs.base import build
    from train.config_doc import field_comments

    comments, config = field_comments(), build("moe_tiny")
    for section in ("train", "mesh", "kernels", "data", "optimizer"):
        missing = [k for k in config[section].keys() if not comments.get(f"{section}.{k}")]
        assert not missing, f"{section}: no comment above {missing}"
    assert comments["model.first_k_dense"] == "the first k blocks use a dense FFN (first_k_dense_replace)"
