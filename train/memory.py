"""Host memory of the train step on CPU: compile it before the first call, give the compiler's heap back.

Measured on ``small`` at 4 x 1,024 tokens (docs/benchmarks.md, issue #15): compiling the train step
grows the process by ~0.7 GB of heap that the compiler frees but glibc keeps; the step's XLA
temporaries are then one large fresh allocation on top of it. ``compile_ahead`` compiles the step
for its real arguments before the first call (``jax.jit`` keeps the executable: the call does not
compile again) and then asks glibc to return the freed heap (``malloc_trim(0)``).

XLA:CPU's default scheduler orders a program for concurrency and hoists buffers (zeroed
accumulators, copies of the Adam moments) to the start of the step, where they stay live through
the forward and backward; ``compiler_options`` selects its memory-minimising scheduler instead.
Neither changes the computation: same operations, same fusions, same results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# XLA:CPU only; the TPU and GPU compilers do not know this option (and schedule for memory already).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": False,
    # Copy insertion that tracks values through control flow (XLA:CPU's debug option; off by
    # default): without it every Adam moment updated in place is copied at the start of the step
    # and the copies stay live through the forward and backward (``small``: 0.22 GiB less
    # temporaries with it; docs/benchmarks.md, issue #15).
    "xla_cpu_copy_insertion_use_region_analysis": True,
}


def compiler_options(platform: str) -> dict:
    """``jax.jit(..., compiler_options=...)`` for a step compiled for devices of ``platform``."""
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None on other C libraries: musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_heap() -> bool:
    """Return the heap that freed allocations left to the OS (glibc ``malloc_trim(0)``); a no-op
    without glibc. True if glibc released memory."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def compile_ahead(step, *args) -> None:
    """Compile ``step`` (``jax.jit`` or ``sharding.MeshJit``) for ``args`` now, so that its first
    call finds the executable in jit's cache, then release the compiler's freed heap."""
    step.lower(*args).compile()
    release_freed_heap()
