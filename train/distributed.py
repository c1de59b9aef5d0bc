"""Multi-process start-up: ``jax.distributed.initialize`` when this is one of several processes.

Call ``initialize`` once, before anything touches a JAX device (``train/main.py`` does). Sources,
first match wins:

  1. flags ``--coordinator_address=host:port --num_processes=N --process_id=i``
  2. env ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (jax's own names)
  3. torchrun-style env ``MASTER_ADDR`` + ``MASTER_PORT`` + ``WORLD_SIZE`` + ``RANK`` (WORLD_SIZE > 1)
  4. an environment jax detects itself, ``jax.distributed.initialize()`` without arguments: SLURM
     with > 1 task and Open MPI are recognised from their env; a Cloud TPU VM pod slice (whose
     workers are listed by the TPU metadata server, not the env) needs ``--distributed`` (``force``)
  5. none of these: a single process, nothing to do.

Then every process sees every device (``jax.devices()``), owns ``jax.local_devices()``, reads its
own rows of each batch, and the mesh spans all of them. On CPU, cross-process collectives need
gloo (``jax_cpu_collectives_implementation``), which is switched on here.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def _auto_detected() -> bool:
    """True when jax's cluster auto-detection will find several processes."""
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def resolve(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    force: bool = False,
) -> Optional[dict]:
    """The arguments for ``jax.distributed.initialize``: a dict (possibly empty = auto-detect), or
    None for a single process."""
    if coordinator_address or num_processes or process_id is not None:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if num_processes == 1:
            return None
        return dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and _env_int("JAX_NUM_PROCESSES"):
        if _env_int("JAX_NUM_PROCESSES") == 1:
            return None
        return dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=_env_int("JAX_NUM_PROCESSES"),
            process_id=_env_int("JAX_PROCESS_ID"),
        )
    if (_env_int("WORLD_SIZE") or 1) > 1 and os.environ.get("MASTER_ADDR"):
        port = os.environ.get("MASTER_PORT", "29500")
        return dict(
            coordinator_address=f"{os.environ['MASTER_ADDR']}:{port}",
            num_processes=_env_int("WORLD_SIZE"),
            process_id=_env_int("RANK"),
        )
    if force or _auto_detected():
        return {}
    return None


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    force: bool = False,
) -> bool:
    """Joins the process group if there is one; returns True if ``jax.distributed`` was started.
    ``force``: call ``jax.distributed.initialize()`` and let jax find the cluster (Cloud TPU pods)."""
    kwargs = resolve(coordinator_address, num_processes, process_id, force)
    if kwargs is None:
        return False
    try:  # XLA:CPU runs cross-process collectives only with an explicit implementation
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - a jax without the option
        pass
    jax.distributed.initialize(**kwargs)
    return True
