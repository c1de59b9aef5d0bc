"""Peak FLOP/s of one device: the denominator of MFU.

MFU = model FLOPs per second / (peak FLOP/s per device x devices). The peak comes, in order, from

  1. ``train.peak_flops`` in the config (source "config"),
  2. the vendor's published dense peak for the device kind and compute dtype (``PEAK_TFLOPS``;
     source "datasheet: <device>, <dtype>, <url>"),
  3. on CPUs (and unknown devices) a measured f32 matmul throughput (source "measured: ...").

The measurement divides the FLOPs by the CPU time this process spent (``time.process_time``,
all threads) and multiplies by the cores it may use: time slices that other processes take on a
shared machine are not counted, so the figure is that of the cores themselves. Timed by the wall
clock instead, the same machine gave 0.055-0.212 TFLOP/s between runs (issue #15); by CPU time
it varies by a few percent (docs/benchmarks.md). It is still a measurement, not a datasheet
figure, and MFU against it says so.

Published peaks are dense (no 2:4 sparsity). TPU numbers are per chip, which is one JAX device
from v4 on (megacore); v2/v3 chips show as two devices (one per TensorCore), so their entries
are half a chip. f32 matmuls at JAX's default precision run as one bf16 pass on TPUs and as TF32
on NVIDIA Ampere and later, so "float32" maps to those rates.
"""

from __future__ import annotations

import functools
import os
import time

_TPU = "https://cloud.google.com/tpu/docs/"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200"
_L4 = "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"

# device_kind pattern -> ({dtype: dense TFLOP/s per JAX device}, source). Patterns are matched
# in order against ``jax.Device.device_kind``: exact for TPUs, substring for GPUs.
PEAK_TFLOPS: tuple[tuple[str, bool, dict, str], ...] = (
    # (pattern, exact, tflops by compute dtype, source)
    ("TPU v2", True, {"bfloat16": 22.5, "float32": 22.5}, _TPU + "v2 (45 TFLOPs per 2-core chip)"),
    ("TPU v3", True, {"bfloat16": 61.5, "float32": 61.5}, _TPU + "v3 (123 TFLOPs per 2-core chip)"),
    ("TPU v4", True, {"bfloat16": 275.0, "float32": 275.0}, _TPU + "v4"),
    ("TPU v5 lite", True, {"bfloat16": 197.0, "float32": 197.0}, _TPU + "v5e"),
    ("TPU v5e", True, {"bfloat16": 197.0, "float32": 197.0}, _TPU + "v5e"),
    ("TPU v5", True, {"bfloat16": 459.0, "float32": 459.0}, _TPU + "v5p"),
    ("TPU v5p", True, {"bfloat16": 459.0, "float32": 459.0}, _TPU + "v5p"),
    ("TPU v6 lite", True, {"bfloat16": 918.0, "float32": 918.0}, _TPU + "v6e"),
    ("TPU v6e", True, {"bfloat16": 918.0, "float32": 918.0}, _TPU + "v6e"),
    ("H100 PCIe", False, {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}, _H100),
    ("H100 NVL", False, {"bfloat16": 835.0, "float16": 835.0, "float32": 417.5}, _H100),
    ("H100", False, {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}, _H100 + " (SXM)"),
    ("H200", False, {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}, _H200 + " (SXM)"),
    ("GH200", False, {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}, _H100 + " (SXM rates)"),
    ("A100", False, {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}, _A100),
    ("L4", False, {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}, _L4),
)


def datasheet_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) from ``PEAK_TFLOPS``, or None for a device kind or dtype not listed."""
    for pattern, exact, tflops, source in PEAK_TFLOPS:
        if (device_kind == pattern) if exact else (pattern in device_kind):
            if dtype in tflops:
                return tflops[dtype] * 1e12, f"datasheet: {device_kind}, {dtype}, {source}"
            return None
    return None


def peak_flops(
    config_value: float | None, *, device_kind: str, dtype: str, local_devices: int = 1
) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from (see the module docstring).

    ``local_devices``: JAX devices sharing this host's CPU cores (the measured fallback is split
    among them; 8 fake CPU devices on 2 cores each get a quarter core).
    """
    if config_value:
        return float(config_value), "config"
    found = datasheet_peak(device_kind, dtype)
    if found is not None:
        return found
    flops, how = measure_cpu_matmul()
    return flops / local_devices, f"measured: {how}" + (f", / {local_devices} devices" if local_devices > 1 else "")


@functools.cache
def measure_cpu_matmul(n: int = 1024, inner: int = 4, reps: int = 8) -> tuple[float, str]:
    """Host f32 matmul FLOP/s: best of ``reps`` chains of ``inner`` [n, n] products, in FLOPs per
    second of this process's CPU time x the cores it may use."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, inner, lambda _, y: y @ w, x)

    kx, kw = jax.random.split(jax.random.key(0))
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jax.random.normal(kx, (n, n), jnp.float32), cpu)
    w = jax.device_put(jax.random.normal(kw, (n, n), jnp.float32) / n**0.5, cpu)  # keeps |y| ~ |x|
    chain(x, w).block_until_ready()  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        chain(x, w).block_until_ready()
        best = min(best, time.process_time() - t0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flops = 2 * n**3 * inner / max(best, 1e-9) * cores
    return flops, f"f32 {n}x{n} matmul per CPU-second x {cores} cores"
