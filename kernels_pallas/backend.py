"""The one kernel-backend switch: ``impl`` and where ``"auto"`` is resolved.

  "scan"        portable XLA: the tiled scan of ``model/grouped_matmul.py``, the jnp router
  "ragged_dot"  XLA's grouped op ``lax.ragged_dot`` (a real grouped kernel on GPU/TPU, a dense
                product over all groups on CPU); the jnp router
  "pallas"      the Pallas kernels of this package (compiled on TPU, interpreted elsewhere: tests)
  "auto"        "pallas" on TPU, "ragged_dot" on GPU, "scan" on CPU (the Pallas kernels need
                scalar prefetch, which the GPU lowerings lack)

``ModelConfig.kernels_impl`` (``config.kernels.impl``) takes these values and every module that
reads it calls ``resolve``.
"""

import jax

IMPLS = ("auto", "scan", "ragged_dot", "pallas")


def resolve(impl: str) -> str:
    """``impl`` for the current backend (never "auto")."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": "ragged_dot"}.get(jax.default_backend(), "scan")


def interpret_default(interpret):
    """Pallas ``interpret`` argument: None means "interpret unless on TPU"."""
    return jax.default_backend() != "tpu" if interpret is None else interpret
