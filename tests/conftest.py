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


# The longest tests (`pytest --durations`, 2-core VM: 35-67 s each), started first. With `--dist
# worksteal` the worker that draws them runs them while the other works through the short ones and
# then takes half of what is left, so the run does not end on one long test with a worker idle.
# Order only: every test sets up what it needs, so no result depends on it.
_FIRST = (
    "tests/train/test_multiprocess.py",
    "tests/train/test_pod_miniature.py",
    "tests/model/test_hf.py::test_finetune_from_converted_checkpoint",
    "tests/train/rl/test_mesh.py",
    "tests/train/test_faults.py::test_sigkill_at_five_points_resumes_bitwise",
    "tests/model/test_generation.py::test_greedy_plain_and_speculative_equal_reference",
    "tests/train/test_memory.py::test_compile_ahead_compiles_once_and_gives_the_plain_steps_results",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable: the rest keep their order
