"""How fast this backend multiplies one vector by a matrix: a batch-1 decode step's building block.

  python -m tools.bench_matvec [--shapes 512x512,256x512,512x2048,512x8192] [--mib 64] [--reps 20]

For each [k, n] shape: ``count`` distinct f32 matrices (``--mib`` MiB in all, more than the 32 MiB
L3 of the 2-core VM, so every pass reads them from memory, as a decode step reads its weights),
multiplied by a [1, k] vector one after another in a compiled loop, each product's input the
vector the previous product's output was added into (a chain, as the layers of a decode step are;
``pass_seconds``, with which ``bench_decode --bandwidth`` times the step's own matrices). Best of
5 calls of ``--reps`` passes. Per shape, one JSON line: microseconds per product, GB/s of weights read, and
the process's CPU time / wall time over the timed calls (about 1: one core did the work; about 2:
both). Then the same matrices as independent products (each reads the pass's input), which a
runtime may run side by side. Results: docs/benchmarks.md, "Generation".
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def pass_seconds(mats: list, reps: int = 20, chained: bool = False) -> tuple[float, float]:
    """One pass = one [1, k] x [k, n] f32 product per matrix of ``mats`` (any shapes), in a compiled
    loop of ``reps`` passes, best of 5 calls -> (seconds per pass, process CPU / wall time over the
    calls: ~1 one core worked, ~2 both). ``chained``: each product's input is the vector the previous
    product's output was added into, as a decode step's layers chain (one product at a time);
    otherwise every product reads the pass's input, and the runtime may run several at once."""

    @jax.jit
    def run(x, mats):
        def body(_, x):
            if chained:
                for w in mats:
                    y = jnp.dot(x[None, : w.shape[0]], w)[0]  # [n]
                    m = min(y.shape[0], x.shape[0])
                    x = x.at[:m].add(1e-12 * y[:m])
                return x
            s = sum(jnp.sum(jnp.dot(x[None, : w.shape[0]], w)) for w in mats)
            return x * (1 + 1e-12 * s)  # the next pass depends on every product

        return jax.lax.fori_loop(0, reps, body, x)

    x = jnp.ones((max(w.shape[0] for w in mats),), jnp.float32)
    run(x, mats).block_until_ready()
    best, cpu, wall = float("inf"), 0.0, 0.0
    for _ in range(5):
        c0, t0 = time.process_time(), time.perf_counter()  # process_time: every thread's CPU time
        run(x, mats).block_until_ready()
        t, c1 = time.perf_counter() - t0, time.process_time()
        best, wall, cpu = min(best, t), wall + t, cpu + c1 - c0
    return best / reps, cpu / wall


def bench(k: int, n: int, mib: int, reps: int, chained: bool) -> dict:
    count = max(1, (mib << 20) // (4 * k * n))
    rng = np.random.default_rng(0)
    mats = [jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k)) for _ in range(count)]
    per_pass, cpu_per_wall = pass_seconds(mats, reps, chained)
    per = per_pass / count
    return {
        "mode": "chained" if chained else "independent",
        "shape": f"{k}x{n}",
        "mb": round(4 * k * n / 1e6, 3),
        "count": count,
        "us_per_product": round(1e6 * per, 2),
        "GBps": round(4 * k * n / per / 1e9, 1),
        "cpu_per_wall": round(cpu_per_wall, 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="512x512,256x512,512x2048,512x8192")
    ap.add_argument("--mib", type=int, default=64, help="weights per pass, in MiB (> the L3 to time memory)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes must be KxN[,KxN...] with positive sizes, got {args.shapes!r}")
    from tools.bench_decode import env  # here: bench_decode imports this module's pass_seconds

    for chained in (True, False):
        for k, n in shapes:
            print(json.dumps({**bench(k, n, args.mib, args.reps, chained), **env()}), flush=True)


if __name__ == "__main__":
    main()
