"""Rotary position embedding with YaRN or Llama-3.1 frequency scaling.

RoPE (Su et al. 2021) rotates pairs of the ``r = qk_rope_head_dim`` decoupled key/query dims by
angle ``pos * inv_freq[i]``. YaRN (Peng et al. 2023; DeepSeek-V3 report Sec. 4.3, which extends
4K -> 128K with s=40, alpha=1, beta=32) blends per frequency between the original ("extrapolated")
and the interpolated ``inv_freq / s`` with a linear ramp over the dims whose number of rotations
over the original context lies between beta_slow (alpha) and beta_fast (beta). The attention
temperature correction sqrt(t) = 0.1 ln(s) + 1 is applied two ways, as DeepSeek's code does:
the cos/sin tables are multiplied by mscale(s, mscale)/mscale(s, mscale_all_dim), and the
softmax scale by mscale(s, mscale_all_dim)^2 (``ModelConfig.softmax_scale``).

Llama 3.1 (Llama 3 report Sec. 3.1; Meta's reference ``apply_scaling``, transformers'
``_compute_llama3_parameters``) rescales by wavelength lambda_i = 2 pi / inv_freq_i against the
original context L with factor s and low/high frequency factors a/b:

  lambda_i < L / b            inv_freq_i                          (high frequency: kept)
  lambda_i > L / a            inv_freq_i / s                      (low frequency: interpolated)
  otherwise                   (1 - m) inv_freq_i / s + m inv_freq_i,   m = (L / lambda_i - a) / (b - a)

and leaves the amplitude and the softmax scale alone.

Pair layout: with ``interleave=True`` the pairs are (x[2i], x[2i+1]) (DeepSeek's released weights
and reference ``view_as_complex``); otherwise (x[i], x[i + r/2]) ("rotate_half" layout).
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from model.config import Llama3RopeConfig, YarnConfig


def yarn_mscale(scale: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim index whose wavelength fits ``num_rotations`` times into ``max_pos``."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def llama3_inv_frequencies(inv_freq: np.ndarray, c: Llama3RopeConfig) -> np.ndarray:
    """Llama 3.1's per-wavelength blend (module docstring): inv_freq [r/2] -> [r/2]."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = c.original_max_position_embeddings / c.low_freq_factor
    high_wavelen = c.original_max_position_embeddings / c.high_freq_factor
    m = (c.original_max_position_embeddings / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
    mid = (1 - m) * inv_freq / c.factor + m * inv_freq
    return np.where(wavelen < high_wavelen, inv_freq, np.where(wavelen > low_wavelen, inv_freq / c.factor, mid))


def inv_frequencies(
    dim: int, theta: float, yarn: Optional[YarnConfig], llama3: Optional[Llama3RopeConfig] = None
) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [r/2] float64, cos/sin amplitude factor)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [r/2]
    if llama3 is not None:
        return llama3_inv_frequencies(inv_freq, llama3), 1.0
    if yarn is None:
        return inv_freq, 1.0
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency ones (interpolated)
    inv_freq = inv_freq / yarn.factor * (1.0 - keep) + inv_freq * keep
    amp = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return inv_freq, amp


def rope_angles(
    positions: jax.Array, dim: int, theta: float, yarn: Optional[YarnConfig], llama3: Optional[Llama3RopeConfig] = None
):
    """cos, sin tables [b, t, r/2] (f32) for integer ``positions`` [b, t]."""
    inv_freq, amp = inv_frequencies(dim, theta, yarn, llama3)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, t, r/2]
    return jnp.cos(ang) * amp, jnp.sin(ang) * amp


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleave: bool) -> jax.Array:
    """Rotate the last dim of ``x`` [b, t, (h,) r] by the angles in cos/sin [b, t, r/2].

    The output keeps ``x``'s pair layout, so q and k rotated alike give the same dot products
    whatever the layout.
    """
    if x.ndim == 4:  # [b, t, h, r]: broadcast over heads
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]  # [..., r/2]
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        y = jnp.stack([y1, y2], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
        y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)
