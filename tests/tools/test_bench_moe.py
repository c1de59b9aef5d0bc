"""tools.bench_moe prints one JSON line per expert count with the documented keys (no timing asserted)."""

import json
import subprocess
import sys


def test_bench_moe_prints_json_lines():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.bench_moe",
            "--experts=4,8",
            "--tokens=64",
            "--top_k=2",
            "--d_model=16",
            "--ffn=8",
            "--repeats=1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    grouped = [r for r in rows if r["impl"] == "grouped"]
    assert [r["experts"] for r in grouped] == [4, 8]
    assert all(r["ms"] > 0 for r in rows)
