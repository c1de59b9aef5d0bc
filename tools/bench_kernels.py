"""Benchmark the Pallas kernels against their XLA counterparts on the current backend.

  python -m tools.bench_kernels            # small shapes on CPU (interpret mode), ~1 min
  python -m tools.bench_kernels --nosmall  # DeepSeek-V3-sized shapes (use on an accelerator)

Prints one JSON line per (kernel, impl): kernel, impl, shape, ms (median), tflops, gbps, backend.
gmm (Pallas) vs `lax.ragged_dot` and the XLA scan (`model.grouped_matmul`); router kernel vs the jnp
reference; fp8 matmul (quantize both operands + block-scaled matmul) vs a bf16 `jnp.dot`.
On CPU the Pallas numbers are interpreter speed.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import fp8, router
from model import grouped_matmul


def _time_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _emit(kernel, impl, shape, ms, flops, nbytes):
    print(
        json.dumps(
            dict(
                kernel=kernel,
                impl=impl,
                shape=shape,
                ms=round(ms, 4),
                tflops=round(flops / ms / 1e9, 6),
                gbps=round(nbytes / ms / 1e6, 4),
                backend=jax.default_backend(),
            )
        ),
        flush=True,
    )


def bench_gmm(small: bool, iters: int):
    m, k, n, g = (256, 128, 128, 4) if small else (8192, 7168, 2048, 32)
    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    sizes = jnp.full((g,), m // g, jnp.int32)
    nbytes = 2 * (m * k + g * k * n + m * n)
    for impl in ("pallas", "ragged_dot", "scan"):
        fn = jax.jit(lambda a, b, s, impl=impl: grouped_matmul.gmm(a, b, s, impl=impl))
        _emit(
            "gmm",
            impl,
            dict(m=m, k=k, n=n, groups=g),
            _time_ms(fn, lhs, rhs, sizes, iters=iters),
            2 * m * k * n,
            nbytes,
        )


def bench_router(small: bool, iters: int):
    t, e = (256, 64) if small else (16384, 256)
    cfg = router.RouterConfig(
        num_experts=e, top_k=6 if small else 8, n_group=8, topk_group=3 if small else 4, routed_scaling_factor=2.5
    )
    logits = jax.random.normal(jax.random.key(1), (t, e), jnp.float32)
    bias = jnp.zeros((e,), jnp.float32)
    flops = t * e * (cfg.top_k * 4 + cfg.n_group * 4 + 4)  # rough elementwise op count
    nbytes = 4 * (t * e + e + 2 * t * cfg.top_k)
    for impl, fn in (("pallas", router.route), ("xla", router.route_reference)):
        fn = jax.jit(lambda x, b, fn=fn: fn(x, b, cfg))
        _emit(
            "router",
            impl,
            dict(tokens=t, experts=e, top_k=cfg.top_k, n_group=cfg.n_group),
            _time_ms(fn, logits, bias, iters=iters),
            flops,
            nbytes,
        )


def bench_fp8(small: bool, iters: int):
    m, k, n = (128, 256, 256) if small else (8192, 7168, 2048)
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(3), (k, n), jnp.bfloat16)
    shape = dict(m=m, k=k, n=n)
    fn = jax.jit(lambda a, b: fp8.fp8_matmul(a, b, impl="pallas"))
    _emit("fp8_matmul", "pallas", shape, _time_ms(fn, x, w, iters=iters), 2 * m * k * n, 2 * (m * k + k * n + m * n))
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    _emit(
        "fp8_matmul", "xla_bf16_dot", shape, _time_ms(fn, x, w, iters=iters), 2 * m * k * n, 2 * (m * k + k * n + m * n)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="small shapes (default on CPU, where Pallas runs interpreted)",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--kernels", default="gmm,router,fp8")
    args = parser.parse_args()
    small = jax.default_backend() == "cpu" if args.small is None else args.small
    benches = dict(gmm=bench_gmm, router=bench_router, fp8=bench_fp8)
    for name in args.kernels.split(","):
        benches[name](small, args.iters)


if __name__ == "__main__":
    main()
