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
    """Per-pair scalar Python from the YaRN paper's definitions (arXiv 2309.00071, Sec. 3.2 "NTK-by-
    parts", eq. 17-19), with the ramp on integer pair indices as DeepSeek-V3's config means it.

    Pair i rotates at theta_i = theta^(-2i/dim), wavelength lambda_i = 2 pi / theta_i, and makes
    r_i = L / lambda_i rotations over the original context L. The paper keeps theta_i where
    r_i > beta (beta_fast), uses theta_i / s where r_i < alpha (beta_slow), and blends linearly
    between: h(theta_i) = (1 - gamma_i) theta_i / s + gamma_i theta_i. DeepSeek (and transformers)
    make gamma linear in the pair index between the last index with r >= beta_fast and the first
    with r <= beta_slow (searched here over i < dim; i.e. floor / ceil of the solved index, clipped
    to [0, dim - 1]). The amplitude factor is sqrt(1/t) = 0.1 ln(s) + 1 per mscale (eq. 22)."""
    if yarn is None:
        return np.array([theta ** (-2 * i / dim) for i in range(dim // 2)]), 1.0
    L, s = yarn.original_max_position_embeddings, yarn.factor
    r = [L / (2 * math.pi * theta ** (2 * i / dim)) for i in range(dim)]  # rotations, decreasing in i
    lo = max([i for i in range(dim) if r[i] >= yarn.beta_fast], default=0)
    hi = min([i for i in range(dim) if r[i] <= yarn.beta_slow], default=dim - 1)
    if hi == lo:
        hi += 0.001
    out = []
    for i in range(dim // 2):
        th = theta ** (-2 * i / dim)
        interp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 1 - gamma_i: 0 keeps theta_i, 1 takes theta_i / s
        out.append((1 - interp) * th + interp * th / s)

    def m(scale, mscale):
        return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0

    return np.array(out), m(s, yarn.mscale) / m(s, yarn.mscale_all_dim)


V3_YARN = YarnConfig(
    factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
)


@pytest.mark.parametrize(
    "dim,yarn",
    [
        (64, None),
        (64, V3_YARN),  # DeepSeek-V3: qk_rope_head_dim 64, 4K -> 128K
        (64, YarnConfig(factor=4.0, original_max_position_embeddings=64, beta_fast=8, beta_slow=2)),
        (16, YarnConfig(factor=8.0, original_max_position_embeddings=32, mscale=0.9, mscale_all_dim=0.7)),
        (8, YarnConfig(factor=4.0, original_max_position_embeddings=1 << 20)),  # ramp past the last pair
    ],
)
def test_inv_freq_closed_form(dim, yarn):
    got, amp = inv_frequencies(dim, 10000.0, yarn)
    want, want_amp = closed_form_inv_freq(dim, 10000.0, yarn)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert math.isclose(amp, want_amp, rel_tol=1e-12)


def test_yarn_angles_at_long_positions():
    """DeepSeek-V3's YaRN at 100K+ positions (its context is 128K) against float64: the f32 angle
    pos * theta_i carries two roundings (theta_i to f32, the product), so its error is at most
    |angle| 2^-23, i.e. up to ~5e-3 rad at 164K; cos/sin must stay within that bound (plus f32
    evaluation error), and any lower precision (bf16 positions or angles) breaks it."""
    pos = np.array([[0, 1, 4095, 4096, 65_537, 100_003, 131_071, 163_839]])
    cos, sin = rope_angles(jnp.asarray(pos), 64, 10000.0, V3_YARN)
    inv, amp = closed_form_inv_freq(64, 10000.0, V3_YARN)
    ang = pos[..., None].astype(np.float64) * inv  # [1, t, 32]
    bound = amp * (np.abs(ang) * 2.0**-23 + 2e-7)
    for got, want in [(cos, amp * np.cos(ang)), (sin, amp * np.sin(ang))]:
        err = np.abs(np.asarray(got, np.float64) - want)
        assert (err <= bound).all(), float((err / bound).max())
    # What interpolation is for: at 128K the slowest pair (theta_31 / 40) has turned less than it
    # did at the end of the original 4K context during pretraining.
    assert ang[0, -2, -1] < 4096 * 10000.0 ** (-62 / 64)


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
