"""Test-wide setup: 8 fake CPU devices (set before jax is imported), shared tolerances, and one
persistent XLA compilation cache per test session.

The cache: many tests train the same tiny model through the trainer (``train_and_evaluate`` builds
a fresh ``jax.jit`` per run, so jit's in-memory cache never sees the earlier identical program);
with a session-wide persistent cache each identical program (only those >= 1 s to compile, jax's
default) is compiled once and loaded from disk afterwards, by both xdist workers and by the
subprocesses the tests start (they inherit the environment). The directory is fresh per session
(``tempfile.mkdtemp``) and removed at its end, so no result depends on an earlier run. A test that
sets its own ``JAX_COMPILATION_CACHE_DIR`` (``test_faults.py``) or its own environment keeps it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Set by the first process that loads this file (the xdist controller, before it starts the workers,
# which inherit it); that process removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="latentmoe-tests-xla-cache-")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
