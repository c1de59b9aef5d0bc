"""tools/bench_matvec.py: one line per shape and mode, sizes from --mib, and a one-line error for bad shapes."""

import json

import pytest

from tools import bench_matvec


def test_lines_per_shape_and_mode(capsys):
    bench_matvec.main(["--shapes", "128x128,64x128", "--mib", "1", "--reps", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mode"], r["shape"]) for r in rows] == [
        ("chained", "128x128"),
        ("chained", "64x128"),
        ("independent", "128x128"),
        ("independent", "64x128"),
    ]
    assert [r["count"] for r in rows] == [16, 32, 16, 32]  # 1 MiB of 64 KiB / 32 KiB f32 matrices
    for r in rows:
        assert r["us_per_product"] > 0 and r["GBps"] > 0 and r["cpu_per_wall"] > 0


def test_bad_shapes_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_matvec.main(["--shapes", "512by512"])
    assert "--shapes must be KxN" in capsys.readouterr().err
