"""``train/memory.py``: compile-ahead, the memory-minimising CPU scheduler, glibc's heap release."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax._src import monitoring

from tests.util import tiny_config
from train import memory, sharding
from train.optimizer import default_optimizer_config, make_optimizer
from train.state import abstract_state, init_state
from train.step import make_train_step, sharded_train_step
from train.synthetic import synthetic_batches

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def test_release_is_a_no_op_without_glibc(monkeypatch):
    """A C library without ``malloc_trim`` (musl, macOS): nothing is called, nothing raised."""

    class NoTrim:  # what ctypes.CDLL gives for a libc lacking the symbol
        def __init__(self, name):
            pass

    monkeypatch.setattr(memory.ctypes, "CDLL", NoTrim)
    memory._malloc_trim.cache_clear()
    try:
        assert memory._malloc_trim() is None
        assert memory.release_freed_heap() is False
    finally:
        memory._malloc_trim.cache_clear()


@pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc (malloc_trim)")
def test_release_returns_freed_heap_to_the_os():
    """Freed malloc chunks between live ones stay in the process until ``malloc_trim``."""
    chunks = [bytes(bytearray(64 * 1024 - 64)) for _ in range(2000)]  # ~128 MB below the mmap threshold
    del chunks[:-1]  # every chunk but the last (which pins the heap's top) freed
    before = _rss_bytes()
    assert memory.release_freed_heap() is True
    assert before - _rss_bytes() > 64 * 2**20


CPU_OPTIONS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": False,
    "xla_cpu_copy_insertion_use_region_analysis": True,
}


def test_cpu_compiler_options_are_cpu_only():
    assert memory.compiler_options("cpu") == CPU_OPTIONS
    assert memory.compiler_options("tpu") == {} and memory.compiler_options("gpu") == {}
    memory.compiler_options("cpu")["x"] = 1  # a copy: the module's table stays as it is
    assert memory.CPU_COMPILER_OPTIONS == CPU_OPTIONS


def test_compile_ahead_compiles_once_and_gives_the_plain_steps_results(monkeypatch):
    """The trainer's step on CPU: compiled ahead (the call then does not compile again) and with
    the memory-minimising scheduler and region-analysis copy insertion, two steps equal the
    default-compiled jit's bit for bit."""
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: compiles.append(e) if e == _COMPILE_EVENT else 0
    )
    c = ml_collections.ConfigDict(dict(mtp_loss_weight=0.3, balance_loss_alpha=0.1, bias_update_rate=1e-3))
    c.microbatches = 1
    cfg = tiny_config(vocab_size=264, n_layers=2, first_k_dense=1, mtp_depth=1, scan_layers=True, remat="full")
    opt = default_optimizer_config()
    opt.warmup_steps = 1
    tx = make_optimizer(opt, 2)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1)))
    graphdef, abstract = abstract_state(cfg, tx, 0)
    state_sh = sharding.tree_shardings(abstract, mesh)
    batches = [sharding.global_batch(b, mesh) for b in synthetic_batches(2, 16, 2, 0)]

    step = sharded_train_step(graphdef, tx, c, mesh, state_sh, donate=False)
    n0 = len(compiles)
    state = sharding.create(lambda: init_state(cfg, tx, 0)[1], state_sh, mesh)  # as the trainer does
    # one program on a one-device mesh too (eager, every op compiled and cached its own executable)
    assert len(compiles) == n0 + 1, f"initialisation compiled {len(compiles) - n0} programs"
    n0 = len(compiles)
    memory.compile_ahead(step, state, batches[0])
    assert len(compiles) == n0 + 1
    got = []
    for b in batches:
        state, m = step(state, b)
        got.append((state, m))
    assert len(compiles) == n0 + 1, "the first call compiled the step again"

    # The same step with XLA:CPU's default (concurrency-optimised) scheduler, called as usual.
    default = sharding.MeshJit(make_train_step(graphdef, tx, c), mesh)
    state = sharding.create(lambda: init_state(cfg, tx, 0)[1], state_sh, mesh)
    for b, (want_state, want_m) in zip(batches, got):
        state, m = default(state, b)
        for x, y in zip(jax.tree.leaves((state, m)), jax.tree.leaves((want_state, want_m))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jnp.isfinite(m["loss"])
