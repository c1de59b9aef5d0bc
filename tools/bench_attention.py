"""Attention backends on this machine: forward + backward time and error against the naive path.

  python -m tools.bench_attention [--seq 1024 4096] [--batch 4] [--heads 8] [--dtype bfloat16]

For each sequence length and each backend that runs here (naive, xla; splash on TPU; cudnn on
GPU) prints one JSON line: the median ms of a jitted forward + backward of sum(o * g), and the
relative difference of the loss and the largest absolute difference of dq, dk, dv from the naive
reference (skipped where the naive [t, t] tensors would not fit). Shapes are MLA's: q/k head dim n + r, v head dim v (the
``small`` preset by default: 64 + 32 and 64). Imports only jax and ``model.attention`` (no grain,
no ml_collections), so it runs on a bare accelerator machine.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from model.attention import attention, resolve_impl

_NAIVE_MAX_BYTES = 8 * 2**30  # skip the reference when its f32 scores alone would exceed this


def _grad_fn(impl, scale):
    def loss(q, k, v, seg, g):
        return jnp.sum(attention(q, k, v, seg, scale=scale, impl=impl).astype(jnp.float32) * g)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def _time(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--qk_dim", type=int, default=96)
    p.add_argument("--v_dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    backend = jax.default_backend()
    dtype = jnp.dtype(a.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    kind = jax.devices()[0].device_kind
    for t in a.seq:
        ks = jax.random.split(jax.random.key(0), 4)
        b, h = a.batch, a.heads
        q = jax.random.normal(ks[0], (b, h, t, a.qk_dim), dtype)
        k = jax.random.normal(ks[1], (b, h, t, a.qk_dim), dtype)
        v = jax.random.normal(ks[2], (b, h, t, a.v_dim), dtype)
        g = jax.random.normal(ks[3], (b, h, t, a.v_dim), jnp.float32)
        seg = jnp.ones((b, t), jnp.int32).at[:, t // 2 :].set(2)  # two packed documents per row
        args, scale = (q, k, v, seg, g), a.qk_dim**-0.5
        impls = ["naive", "xla"] + {"tpu": ["splash"], "gpu": ["cudnn"]}.get(backend, [])
        ref = None
        if 3 * b * h * t * t * 4 <= _NAIVE_MAX_BYTES:
            ref = _grad_fn("naive", scale)(*args)
        for impl in impls:
            if impl == "naive" and ref is None:
                continue
            try:
                resolve_impl(impl, backend=backend, seq_len=t, dtype=dtype, qk_head_dim=a.qk_dim, device_kind=kind)
            except ValueError as e:
                print(json.dumps({"seq": t, "impl": impl, "skipped": str(e)}), flush=True)
                continue
            fn = _grad_fn(impl, scale)
            line = {
                "seq": t,
                "impl": impl,
                "backend": backend,
                "device": kind,
                "dtype": dtype.name,
                "batch": b,
                "heads": h,
                "ms_fwd_bwd": round(1e3 * _time(fn, args, a.reps), 2),
            }
            if ref is not None and impl != "naive":
                out = fn(*args)
                line["loss_rel_diff"] = float(jnp.abs(out[0] - ref[0]) / max(1.0, abs(float(ref[0]))))
                line["max_abs_diff_grads"] = [
                    float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                    for x, y in zip(out[1], ref[1])
                ]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
