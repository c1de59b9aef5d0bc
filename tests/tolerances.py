"""One dtype-aware tolerance helper for every reference comparison."""

import jax.numpy as jnp
import numpy as np

# (rtol, atol) per dtype: 1e-5 for simple f32 modules; composite modules pass composite=True.
_TOL = {
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


def tol(dtype, composite: bool = False):
    rtol, atol = _TOL[jnp.dtype(dtype)]
    if composite and jnp.dtype(dtype) == jnp.float32:
        rtol, atol = 1e-4, 1e-4
    return dict(rtol=rtol, atol=atol)


def assert_close(actual, expected, dtype=jnp.float32, composite: bool = False, err_msg: str = ""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), err_msg=err_msg, **tol(dtype, composite)
    )
