"""RoPE and YaRN against the closed form (Su et al. 2021; Peng et al. 2023 eq. 17-20; DeepSeek-V3 Sec. 4.3)."""

import cmath
import math

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import YarnConfig
from model.rope import apply_rope, inv_frequencies, rope_angles
from tests.tolerances import assert_close


def closed_form_inv_freq(dim, theta, yarn):
    """Per-dim scalar Python, written from the YaRN paper's definitions."""
    out = []
    for i in range(dim // 2):
        base = theta ** (-2 * i / dim)
        if yarn is None:
            out.append(base)
            continue
        wavelength = 2 * math.pi / base
        rotations = yarn.original_max_position_embeddings / wavelength  # r(d) = L / lambda_d
        # ramp over dim index between the dims where r = beta_fast and r = beta_slow
        d_fast = (
            dim
            * math.log(yarn.original_max_position_embeddings / (yarn.beta_fast * 2 * math.pi))
            / (2 * math.log(theta))
        )
        d_slow = (
            dim
            * math.log(yarn.original_max_position_embeddings / (yarn.beta_slow * 2 * math.pi))
            / (2 * math.log(theta))
        )
        lo, hi = max(math.floor(d_fast), 0), min(math.ceil(d_slow), dim - 1)
        gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep, 1: interpolate
        out.append(base * (1 - gamma) + base / yarn.factor * gamma)
        del rotations
    return np.array(out)


@pytest.mark.parametrize(
    "yarn",
    [
        None,
        YarnConfig(factor=40.0, original_max_position_embeddings=4096),
        YarnConfig(factor=4.0, original_max_position_embeddings=64, beta_fast=8, beta_slow=2),
    ],
)
def test_inv_freq_closed_form(yarn):
    got, amp = inv_frequencies(64, 10000.0, yarn)
    np.testing.assert_allclose(got, closed_form_inv_freq(64, 10000.0, yarn), rtol=1e-12)
    assert amp == 1.0 or yarn is not None


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_is_complex_multiplication(interleave):
    dim, theta = 8, 100.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, dim)).astype(np.float32)
    pos = np.array([[0, 5, 17]])
    cos, sin = rope_angles(jnp.asarray(pos), dim, theta, None)
    y = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleave=interleave))
    for t in range(3):
        for i in range(dim // 2):
            a, b = (2 * i, 2 * i + 1) if interleave else (i, i + dim // 2)
            z = complex(x[0, t, a], x[0, t, b]) * cmath.exp(1j * pos[0, t] * theta ** (-2 * i / dim))
            assert_close([y[0, t, a], y[0, t, b]], [z.real, z.imag])


def test_relative_position_property():
    """q.k after rotation depends only on the position difference."""
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 16)), jnp.float32) for _ in range(2))
    yarn = YarnConfig(factor=8.0, original_max_position_embeddings=32)

    def dot(pq, pk):
        cq, sq = rope_angles(jnp.array([[pq]]), 16, 10000.0, yarn)
        ck, sk = rope_angles(jnp.array([[pk]]), 16, 10000.0, yarn)
        return float(jnp.sum(apply_rope(q, cq, sq, interleave=True) * apply_rope(k, ck, sk, interleave=True)))

    np.testing.assert_allclose(dot(3, 1), dot(40, 38), rtol=1e-4)


def test_yarn_softmax_scale():
    from tests.util import tiny_config

    cfg = tiny_config(yarn=YarnConfig(factor=40.0, mscale=1.0, mscale_all_dim=1.0))
    m = 0.1 * math.log(40.0) + 1.0
    assert math.isclose(cfg.softmax_scale, cfg.qk_head_dim**-0.5 * m * m)
