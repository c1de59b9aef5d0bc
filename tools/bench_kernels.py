"""Benchmark the kernels and the FP8 recipe against their baselines on the current backend.

  python -m tools.bench_kernels                    # CPU: small shapes / few tokens, a few minutes
  python -m tools.bench_kernels --nosmall          # DeepSeek-V3-sized (use on an accelerator)
  python -m tools.bench_kernels --kernels=fp8 --tokens=128 --modes=fwd   # one part, chosen sizes

Prints one JSON line per (kernel, impl or recipe): ms (median), tflops, backend, and more per kernel.
gmm (Pallas) vs `lax.ragged_dot` and the XLA scan (`model.grouped_matmul`); router kernel vs the jnp
reference. fp8: every linear GEMM of one `deepseek_v3_671b` layer (MLA projections, dense FFN
18432, shared expert, routed experts' grouped gate/up and down at d 7168, moe_ffn 2048) at its real
weight shape, with `recipe="bf16"` and `"fp8"` through the model's entry points (`model.linear`,
`model.grouped_matmul.gmm`), forward alone and forward + backward (fprop, dgrad, wgrad); `--small`
only shrinks the tokens (and the experts per device), never the weights. The fp8 line carries
`fp8_over_bf16` (bf16 ms / fp8 ms). On CPU the Pallas numbers are interpreter speed and FP8 is
emulated (upcast), so fp8 is slower there. Imports neither grain nor ml_collections (GPU machine).
"""

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import router
from model import grouped_matmul, linear, presets


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


def v3_gemms(cfg, tokens: int, groups: int) -> list[dict]:
    """Every linear GEMM of one ``cfg`` layer as the model calls it: (name, spec, x shape, w shape)
    for ``model.linear.linear`` (MLA projections, dense FFN, shared expert) and (name, m, k, n,
    groups) for the routed experts' grouped matmul (``tokens`` rows spread evenly over ``groups``
    experts: DeepSeek-V3's 256 experts over an expert-parallel degree of 8 is 32 per device)."""
    d, h, c, r = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n, v, f, fe = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.dense_ffn_dim, cfg.moe_ffn_dim
    fs = cfg.n_shared_experts * fe
    t = tokens
    dense = [("mla.wkv_a", "btd,dc->btc", (1, t, d), (d, c + r))]
    if cfg.q_lora_rank is None:
        dense.insert(0, ("mla.wq", "btd,dhk->bthk", (1, t, d), (d, h, n + r)))
    else:
        q = cfg.q_lora_rank
        dense[:0] = [
            ("mla.wq_a", "btd,dq->btq", (1, t, d), (d, q)),
            ("mla.wq_b", "btq,qhk->bthk", (1, t, q), (q, h, n + r)),
        ]
    dense += [
        ("mla.wkv_b", "bsc,chk->bshk", (1, t, c), (c, h, n + v)),
        ("mla.wo", "bhtv,hvd->btd", (1, h, t, v), (h, v, d)),
        ("dense_ffn.gate_up", "...d,df->...f", (t, d), (d, f)),
        ("dense_ffn.down", "...f,fd->...d", (t, f), (f, d)),
    ]
    if fs:
        dense += [
            ("shared_expert.gate_up", "...d,df->...f", (t, d), (d, fs)),
            ("shared_expert.down", "...f,fd->...d", (t, fs), (fs, d)),
        ]
    rows = -(-t // groups) * groups
    grouped = [("experts.gate_up", rows, d, fe, groups), ("experts.down", rows, fe, d, groups)]
    return [dict(name=a, spec=s, x=x, w=w) for a, s, x, w in dense] + [
        dict(name=a, m=m, k=k, n=nn, groups=g) for a, m, k, nn, g in grouped
    ]


def gemm_flops(g: dict) -> int:
    """2 M K N of the forward product (fwd_bwd adds dgrad and wgrad: 3x)."""
    if "spec" not in g:
        return 2 * g["m"] * g["k"] * g["n"]
    n_out = _out_rank(g["spec"])
    k = math.prod(g["w"][: len(g["w"]) - n_out])
    return 2 * (math.prod(g["x"]) // k) * math.prod(g["w"])


def _gemm_fn(g: dict, recipe: str, mode: str, dtype, impl: str):
    """(jitted fn, args): the forward product, or forward + the two backward products (dgrad,
    wgrad) as ``jax.vjp`` runs them in training."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    if "spec" in g:
        x = jax.random.normal(kx, g["x"], dtype)
        w = (jax.random.normal(kw, g["w"], jnp.float32) * g["w"][0] ** -0.5).astype(dtype)
        fwd = lambda a, b: linear.linear(g["spec"], a, b, dtype=dtype, recipe=recipe)
        args = (x, w)
        out_shape = jax.eval_shape(fwd, x, w).shape
    else:
        m, k, n, groups = g["m"], g["k"], g["n"], g["groups"]
        x = jax.random.normal(kx, (m, k), dtype)
        w = (jax.random.normal(kw, (groups, k, n), jnp.float32) * k**-0.5).astype(dtype)
        sizes = jnp.full((groups,), m // groups, jnp.int32)
        fwd = lambda a, b: grouped_matmul.gmm(a, b, sizes, impl=impl, recipe=recipe)
        args = (x, w)
        out_shape = (m, n)
    if mode == "fwd":
        return jax.jit(fwd), args
    dy = jax.random.normal(kg, out_shape, dtype)

    def fwd_bwd(a, b, dy):
        y, vjp = jax.vjp(fwd, a, b)
        return y, *vjp(dy)

    return jax.jit(fwd_bwd), (*args, dy)


def _out_rank(spec: str) -> int:
    """Number of the weight's output letters (its last ones): those in the result but not in x."""
    lhs, out = spec.split("->")
    x_letters, _ = lhs.split(",")
    return sum(ch not in x_letters for ch in out.replace("...", ""))


def bench_fp8(
    small: bool, iters: int, *, cfg=None, tokens=None, groups=None, modes=("fwd", "fwd_bwd"), gemms=None, impl="auto"
):
    """fp8 against bf16 for every linear GEMM of ``cfg`` (default ``deepseek_v3_671b``), through the
    model's own entry points (``model.linear.linear``, ``model.grouped_matmul.gmm``) with
    ``recipe`` "bf16" and "fp8"; bf16 operands and compute dtype in both. One JSON line per
    (GEMM, mode, recipe); the fp8 line carries ``fp8_over_bf16`` = bf16 ms / fp8 ms (> 1: fp8 is
    faster). A GEMM the recipe refuses prints its error instead of a time. ``gemms``: names to run
    (default all)."""
    cfg = cfg or presets.deepseek_v3_671b()
    tokens = tokens or (64 if small else 8192)
    groups = groups or (4 if small else 32)
    for g in v3_gemms(cfg, tokens, groups):
        if gemms and g["name"] not in gemms:
            continue
        shape = {k: g[k] for k in g if k != "name"}
        for mode in modes:
            ms = {}
            for recipe in ("bf16", "fp8"):
                base = dict(kernel="gemm", gemm=g["name"], mode=mode, recipe=recipe, shape=shape)
                try:
                    fn, args = _gemm_fn(g, recipe, mode, jnp.bfloat16, impl)
                    ms[recipe] = _time_ms(fn, *args, iters=iters)
                except Exception as e:  # one refused GEMM must not hide the others
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
                    print(json.dumps(dict(base, error=f"{type(e).__name__}: {msg}")), flush=True)
                    continue
                flops = gemm_flops(g) * (3 if mode == "fwd_bwd" else 1)
                row = dict(base, ms=round(ms[recipe], 4), tflops=round(flops / ms[recipe] / 1e9, 6))
                if recipe == "fp8" and "bf16" in ms:
                    row["fp8_over_bf16"] = round(ms["bf16"] / ms["fp8"], 4)
                print(json.dumps(dict(row, backend=jax.default_backend())), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="small shapes (default on CPU, where Pallas runs interpreted); fp8: few tokens",
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--kernels", default="gmm,router,fp8")
    parser.add_argument("--tokens", type=int, default=None, help="fp8: rows per GEMM (default 64 small, 8192)")
    parser.add_argument("--groups", type=int, default=None, help="fp8: experts per device (default 4 small, 32)")
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="fp8: fwd and/or fwd_bwd")
    parser.add_argument("--gemms", default="", help="fp8: comma-separated GEMM names (default all)")
    args = parser.parse_args()
    small = jax.default_backend() == "cpu" if args.small is None else args.small
    benches = dict(
        gmm=bench_gmm,
        router=bench_router,
        fp8=lambda s, i: bench_fp8(
            s,
            i,
            tokens=args.tokens,
            groups=args.groups,
            modes=args.modes.split(","),
            gemms=[n for n in args.gemms.split(",") if n],
        ),
    )
    for name in args.kernels.split(","):
        if name not in benches:
            raise SystemExit(f"--kernels: unknown {name!r}; known: {sorted(benches)}")
        benches[name](small, args.iters)


if __name__ == "__main__":
    main()
