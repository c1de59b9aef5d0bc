"""Two processes on localhost (``jax.distributed`` with gloo CPU collectives) train like one.

1. In this process: 3 steps of a narrow moe_tiny on 1 device (the default mesh), checkpoint A.
2. Two worker processes, 2 CPU devices each, mesh data=2 x expert=2 (the expert all-to-all crosses
   processes): 3 steps from scratch -> checkpoint B (written collectively); then resume a copy of
   A (a 1-process checkpoint) for a 4th step.
3. In this process: resume a copy of B (a 2-process checkpoint) for a 4th step.
The 2-process losses equal the 1-process ones, and the two 4th steps (each from the other's
checkpoint) agree. Each process reads only its rows of every global batch (``train/data.py``).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]


def config(corpus: str, steps: int, **mesh):
    from configs import moe_tiny

    c = moe_tiny.get_config()
    c.data.source = corpus
    c.data.seq_len = 32
    c.data.val_percent = 20
    c.train.global_batch_size = 8
    c.train.steps = steps
    c.train.eval_every = 100
    c.train.eval_batches = 1
    c.train.checkpoint_every = 100
    c.train.async_checkpoint = False
    c.train.progress = False
    c.train.tracker = "none"
    c.train.peak_flops = 1e12  # skip the start-up matmul benchmark
    c.model.mtp_depth = 0  # compile time: the MoE path is exercised by the main MoE block
    c.optimizer.lr = 3e-4  # see test_parallel_equivalence.py: a small lr keeps Adam well-conditioned
    c.optimizer.warmup_steps = 1
    c.model.d_model = 64
    c.model.n_layers = 2
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def worker(coordinator: str, process_id: int, corpus: str, dir_b: str, dir_a2: str):
    """One of the two processes (run as ``python -m tests.train.test_multiprocess ...``)."""
    from train import distributed

    assert distributed.initialize(coordinator, 2, process_id)
    import jax

    from train.trainer import train_and_evaluate

    assert jax.process_count() == 2 and jax.device_count() == 4
    train_and_evaluate(config(corpus, 3, data=2, expert=2), dir_b)
    train_and_evaluate(config(corpus, 4, data=2, expert=2), dir_a2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, path in enumerate(sorted(Path(__file__).parent.glob("*.py"))[:6]):
        shutil.copy(path, d / f"doc{i}.txt")
    return str(d / "*.txt")


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path, corpus):
    from train.trainer import train_and_evaluate

    dir_a, dir_b = tmp_path / "one_process", tmp_path / "two_processes"
    train_and_evaluate(config(corpus, 3), str(dir_a))
    dir_a2 = tmp_path / "a_resumed_by_two"
    shutil.copytree(dir_a, dir_a2)

    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO)
    )
    coordinator = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.train.test_multiprocess",
                coordinator,
                str(i),
                corpus,
                str(dir_b),
                str(dir_a2),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]

    one, two = losses(dir_a), losses(dir_b)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert_close([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], composite=True)

    dir_b2 = tmp_path / "b_resumed_by_one"
    shutil.copytree(dir_b, dir_b2, ignore=shutil.ignore_patterns("metrics.jsonl", "summary.json"))
    train_and_evaluate(config(corpus, 4), str(dir_b2))
    step4_by_one, step4_by_two = losses(dir_b2)[4], losses(dir_a2)[4]
    assert_close(step4_by_two, step4_by_one, composite=True)
    assert np.isfinite(step4_by_one)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
