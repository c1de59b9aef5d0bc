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


# The pod in miniature (tests/train/test_pod_miniature.py): bf16 compute on 8 devices vs 1 device.
# With bf16's unit roundoff u = 2^-8 ~ 3.9e-3 (8 significand bits), the partitioned step rounds at other points than
# the 1-device one (tensor-parallel partial sums psum'ed in bf16, matmuls split over f and d), so
# each activation differs by about u (f32 compute: 1e-6, the combination itself is exact).
#  "loss": the per-step losses (means over 1024 tokens, the roundings average out), rtol u; measured
#     <= 1e-3 (2-core CPU, jax 0.10.2).
#  "grad_norm": the global gradient norm and each tensor's | ||g|| / ||g_ref|| - 1 |, 0.1: a norm sums
#     the squared differences and the gradient alike, so it moves by ~ r^2 / 2 + r cos for a relative
#     difference r; measured <= 0.052 per tensor, 0.002 global. A constant scale error in a gradient
#     (a doubled psum: 1.0) is 10x past it.
#  "grad": each tensor's ||g - g_ref|| / ||g_ref||, 0.5. At initialisation a weight's gradient is a
#     sum of per-token terms that cancel to ~1/sqrt(1024) ~ 1/30 of their size, so the rounding
#     differences of the terms are amplified ~30x relative to the sum: ~30u ~ 0.12 typical; measured
#     median 0.11, max 0.27 (the MTP block's router and norms, whose gradients cancel most).
POD_MINIATURE = {"loss": 4e-3, "grad_norm": 0.1, "grad": 0.5}
