"""Multi-token prediction: targets, shifts and masks (DeepSeek-V3 report Sec. 2.2)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.loss import lm_losses, mtp_targets
from model.mtp import shift_left
from model.transformer import Transformer
from tests.util import tiny_config


def test_mtp_targets_shift_and_mask():
    # one row with two packed documents and padding: tokens 10..14 | 20..22 | pad
    inputs = jnp.array([[10, 11, 12, 13, 14, 20, 21, 22, 0, 0]])
    targets = jnp.array([[11, 12, 13, 14, 15, 21, 22, 23, 0, 0]])
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    mask = (seg != 0).astype(jnp.float32)
    tgt, m = mtp_targets(targets, mask, seg, 1)
    # depth 1 at i predicts t_{i+2} = targets[i+1], only inside the same document
    np.testing.assert_array_equal(np.asarray(tgt)[0, :7], [12, 13, 14, 15, 21, 22, 23])
    np.testing.assert_array_equal(np.asarray(m)[0], [1, 1, 1, 1, 0, 1, 1, 0, 0, 0])
    tgt2, m2 = mtp_targets(targets, mask, seg, 2)
    np.testing.assert_array_equal(np.asarray(tgt2)[0, :3], [13, 14, 15])
    np.testing.assert_array_equal(np.asarray(m2)[0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(shift_left(inputs, 3))[0], [13, 14, 20, 21, 22, 0, 0, 0, 0, 0])


def test_mtp_module_sees_token_k_ahead_and_nothing_later():
    """MTP depth-1 logits at position i depend on inputs[: i + 2] only (h_i and Emb(t_{i+1}))."""
    cfg = tiny_config(mtp_depth=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    mtp = nnx.jit(lambda m, x: m(x).mtp_logits)
    x = jax.random.randint(jax.random.key(0), (1, 10), 0, cfg.vocab_size)
    base = mtp(model, x)
    i = 4
    changed = mtp(model, x.at[0, i + 1].set((x[0, i + 1] + 1) % cfg.vocab_size))
    assert not np.allclose(base[0, 0, i], changed[0, 0, i])  # depth 1 uses t_{i+1}
    later = mtp(model, x.at[0, i + 2].set((x[0, i + 2] + 1) % cfg.vocab_size))
    np.testing.assert_array_equal(np.asarray(base[0, 0, i]), np.asarray(later[0, 0, i]))  # not t_{i+2}
    assert not np.allclose(base[1, 0, i], later[1, 0, i])  # depth 2 uses t_{i+2}


def test_mtp_loss_is_weighted_mean_over_depths():
    cfg = tiny_config(mtp_depth=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    inputs = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    targets = jnp.roll(inputs, -1, axis=1)
    seg = jnp.ones_like(inputs)
    batch = {"targets": targets, "loss_mask": jnp.ones(inputs.shape).at[:, -1].set(0), "segment_ids": seg}
    out = nnx.jit(lambda m, x: m(x))(model, inputs)
    got = lm_losses(out, batch, mtp_weight=0.3)["mtp_loss"]
    total = 0.0
    for k in (1, 2):
        lp = jax.nn.log_softmax(out.mtp_logits[k - 1])
        tgt, m = mtp_targets(targets, batch["loss_mask"], seg, k)
        nll = -np.take_along_axis(np.asarray(lp), np.asarray(tgt)[..., None], -1)[..., 0]
        total += (nll * np.asarray(m)).sum() / np.asarray(m).sum()
    np.testing.assert_allclose(float(got), 0.3 * total / 2, rtol=1e-5)
