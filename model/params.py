"""Parameter creation with logical axis names.

Every weight carries an ``axes`` metadata tuple of *logical* names (``"embed"``, ``"heads"``,
``"expert"``, ...). The model never names mesh axes; ``train/sharding.py`` owns the one table that
maps logical names to mesh axes. Initialisers follow DeepSeek's reference (normal, std 0.006 for
linear layers is V3's choice; we use fan-in scaled normals which train better at toy size).
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(
    init: Callable,
    shape: Sequence[int],
    dtype,
    axes: Sequence[Optional[str]],
    *,
    rngs: Optional[nnx.Rngs],
    stddev: Optional[float] = None,
) -> nnx.Param:
    """Create an ``nnx.Param`` of ``shape`` with logical ``axes`` metadata."""
    assert len(axes) == len(shape), (shape, axes)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    if stddev is not None:
        value = stddev * jax.random.normal(key, tuple(shape), jnp.float32)
    else:
        value = init(key, tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def linear_param(shape: Sequence[int], fan_in: int, dtype, axes, *, rngs: nnx.Rngs) -> nnx.Param:
    """A weight initialised N(0, 1/fan_in)."""
    return param(None, shape, dtype, axes, rngs=rngs, stddev=fan_in**-0.5)
