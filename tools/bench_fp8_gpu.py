"""How fast is each way of writing DeepSeek-V3's fine-grained FP8 GEMM on this backend?

Groundwork for FP8 training (the FP8 issue): before wiring FP8 into the model, measure which
formulation of the block-scaled product (report Sec. 3.3.1-3.3.2: activations per 1x128 tile,
weights per 128x128 block, f32 promotion every 128 along K) is fast on a GPU, against a plain bf16
product of the same shape.

  python -m tools.bench_fp8_gpu            # small shapes (CPU: correctness only, Pallas interpreted)
  python -m tools.bench_fp8_gpu --no-small # DeepSeek-V3 expert / projection shapes (on a GPU)

Formulations (all take already-quantized operands, so quantization is timed on its own line):
- bf16:          x @ w in bf16, f32 accumulation (the baseline).
- fp8_tensor:    one e4m3 dot_general, one scale per tensor (the upper bound XLA reaches with FP8
                 operands; NOT DeepSeek's granularity, a ceiling only).
- fp8_kbatched:  e4m3 dot_general batched over the K/128 blocks -> [K/128, m, n] f32, then scaled and
                 summed (kernels_pallas/fp8/reference.py's maths as one batched product).
- fp8_kloop:     kernels_pallas/fp8/reference.py as written: one e4m3 dot per K block, scaled, added.
- pallas_triton: a Pallas (Triton backend) kernel: per (128 x 128) output tile, loop over K blocks,
                 e4m3 dot with f32 result, times both scales, accumulated in f32 (DeepGEMM's scheme).
Prints one JSON line per formulation: name, shape, ms (median), tflops, rel_err (bf16 and fp8_tensor
against the exact product of the unquantized operands; the block-scaled ones against the f32
product of their dequantized operands, so there it measures the GEMM alone), backend.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.fp8 import reference
from tools.bench_kernels import _time_ms

BLOCK = reference.BLOCK
F8 = jnp.float8_e4m3fn


def quantize_tensor(a):
    """One scale for the whole tensor: a -> (e4m3 [r, c], f32 scalar)."""
    scale = jnp.max(jnp.abs(a.astype(jnp.float32))) / 448.0
    return (a.astype(jnp.float32) / scale).astype(F8), scale


def fp8_tensor(xq, sx, wq, sw):
    """One scale per tensor (a ceiling for speed, not DeepSeek's granularity): sx, sw scalars."""
    y = lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * (sx * sw)).astype(jnp.bfloat16)  # [m, n]


def fp8_kbatched(xq, sx, wq, sw):
    m, k = xq.shape
    n = wq.shape[1]
    kb = k // BLOCK
    xb = xq.reshape(m, kb, BLOCK)  # [m, kb, 128]
    wb = wq.reshape(kb, BLOCK, n)  # [kb, 128, n]
    part = lax.dot_general(xb, wb, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [kb, m, n]
    swn = jnp.repeat(sw, BLOCK, axis=1)  # [kb, n]
    return jnp.einsum("bmn,mb,bn->mn", part, sx, swn).astype(jnp.bfloat16)  # [m, n]


def fp8_kloop(xq, sx, wq, sw):
    acc = jnp.zeros((xq.shape[0], wq.shape[1]), jnp.float32)  # [m, n]
    for b in range(xq.shape[1] // BLOCK):
        ks = slice(b * BLOCK, (b + 1) * BLOCK)
        part = lax.dot_general(
            xq[:, ks], wq[ks], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [m, n]
        acc = acc + part * sx[:, b : b + 1] * jnp.repeat(sw[b], BLOCK)[None, :]
    return acc.astype(jnp.bfloat16)


def _triton_kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, n_kblocks):
    def body(b, acc):
        ks = pl.ds(pl.multiple_of(b * BLOCK, BLOCK), BLOCK)
        part = lax.dot_general(
            x_ref[:, ks], w_ref[ks, :], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [bm, bn]
        scale = sx_ref[:, pl.ds(b, 1)] * sw_ref[pl.ds(b, 1), :]  # [bm, 1] * [1, 1]
        return acc + part * scale

    acc = lax.fori_loop(0, n_kblocks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def pallas_triton(xq, sx, wq, sw, *, bm=128, num_warps=4, num_stages=3, interpret=False):
    m, k = xq.shape
    n = wq.shape[1]
    kb = k // BLOCK
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_triton_kernel, n_kblocks=kb),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(m // bm, n // BLOCK),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, kb), lambda i, j: (i, 0)),
            pl.BlockSpec((k, BLOCK), lambda i, j: (0, j)),
            pl.BlockSpec((kb, 1), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, BLOCK), lambda i, j: (i, j)),
        interpret=interpret,
        **kw,
    )(xq, sx, wq, sw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    backend = jax.default_backend()
    small = backend == "cpu" if args.small is None else args.small
    # DeepSeek-V3: expert up/gate (d 7168 -> 2048), expert down (2048 -> 7168), q_b (1536 -> 24576).
    shapes = [(256, 256, 256)] if small else [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 1536, 24576)]
    interpret = backend != "gpu"
    for m, k, n in shapes:
        kx, kw_ = jax.random.split(jax.random.key(m + k + n))
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
        w = (0.02 * jax.random.normal(kw_, (k, n), jnp.float32)).astype(jnp.bfloat16)
        xq, sx = reference.quantize_reference(x, 1)  # [m, k] e4m3, [m, k/128]
        wq, sw = reference.quantize_reference(w, BLOCK)  # [k, n] e4m3, [k/128, n/128]
        ref = np.asarray(
            jnp.dot(
                reference.dequantize_reference(xq, sx, 1),
                reference.dequantize_reference(wq, sw, BLOCK),
                precision=lax.Precision.HIGHEST,
            ),
            np.float64,
        )
        shape = dict(m=m, k=k, n=n)
        flops = 2 * m * k * n

        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)

        def emit(name, ms, out, against=ref, **extra):
            out = np.asarray(out.astype(jnp.float32), np.float64)
            err = float(np.linalg.norm(out - against) / np.linalg.norm(against))
            print(
                json.dumps(
                    dict(
                        name=name,
                        shape=shape,
                        ms=round(ms, 4),
                        tflops=round(flops / ms / 1e9, 3),
                        rel_err=float(f"{err:.3g}"),
                        backend=backend,
                        **extra,
                    )
                ),
                flush=True,
            )

        bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        emit("bf16", _time_ms(bf16, x, w, iters=args.iters), bf16(x, w), against=exact)
        xt, st_x = quantize_tensor(x)
        wt, st_w = quantize_tensor(w)
        f = jax.jit(fp8_tensor)
        emit("fp8_tensor", _time_ms(f, xt, st_x, wt, st_w, iters=args.iters), f(xt, st_x, wt, st_w), against=exact)
        quant = jax.jit(lambda a: reference.quantize_reference(a, 1))
        ms = _time_ms(quant, x, iters=args.iters)
        print(
            json.dumps(
                dict(
                    name="quantize_1x128",
                    shape=dict(m=m, k=k),
                    ms=round(ms, 4),
                    gbps=round(3 * m * k / ms / 1e6, 1),
                    backend=backend,
                )
            ),
            flush=True,
        )
        cases = [("fp8_kbatched", fp8_kbatched), ("fp8_kloop", fp8_kloop)]
        if backend == "gpu" or small:
            for bm, warps, stages in ((128, 4, 3), (128, 8, 4), (64, 4, 4)):
                if m % bm:
                    continue
                cases.append(
                    (
                        f"pallas_triton_bm{bm}_w{warps}_s{stages}",
                        functools.partial(
                            pallas_triton, bm=bm, num_warps=warps, num_stages=stages, interpret=interpret
                        ),
                    )
                )
        for name, fn in cases:
            try:
                f = jax.jit(fn)
                emit(name, _time_ms(f, xq, sx, wq, sw, iters=args.iters), f(xq, sx, wq, sw))
            except Exception as e:  # one failing formulation must not hide the others
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
                print(
                    json.dumps(dict(name=name, shape=shape, error=f"{type(e).__name__}: {msg}", backend=backend)),
                    flush=True,
                )


if __name__ == "__main__":
    main()
