"""Gradient accumulation (``train.microbatches`` > 1, the pod runs 15) equals one big batch.

The losses are means over the valid tokens of the whole global batch, so microbatches with
unequal valid-token counts must be weighted by their counts, not averaged as means of means;
the expert loads of the bias update are summed over every microbatch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.tolerances import assert_close
from tests.util import grad_capture, tiny_config
from train.state import init_state
from train.step import make_train_step

B, T = 4, 16


def _batch() -> dict:
    """4 rows, split strided into microbatches {0, 2} and {1, 3} (``train.step._split_micro``):
    rows 0, 2 are nearly full, rows 1, 3 mostly padding, and row 2 packs two documents (MTP
    targets stop at the boundary). Valid tokens per microbatch: 30 vs 7."""
    rng = np.random.default_rng(0)
    toks = rng.integers(1, 64, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 15:] = 0
    seg[1, 4:] = 0
    seg[2, 9:] = 2
    seg[3, 3:] = 0
    mask = (seg > 0).astype(np.float32)
    mask[2, 14] = 0.0  # a masked token inside a document
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        for s in np.unique(seg[r]):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return dict(
        inputs=jnp.asarray(toks[:, :-1] * (seg > 0)),
        targets=jnp.asarray(toks[:, 1:] * (seg > 0)),
        segment_ids=jnp.asarray(seg),
        positions=jnp.asarray(pos),
        loss_mask=jnp.asarray(mask),
    )


def _run(microbatches: int):
    cfg = tiny_config(n_layers=2)  # a dense and a MoE block, an MTP module (MoE), dropless
    tx = grad_capture()
    graphdef, state = init_state(cfg, tx, seed=0)
    train_cfg = ml_collections.ConfigDict(
        dict(mtp_loss_weight=0.3, balance_loss_alpha=0.1, bias_update_rate=1e-3, microbatches=microbatches)
    )
    new, metrics = jax.jit(make_train_step(graphdef, tx, train_cfg))(state, _batch())
    return state, new, metrics


@pytest.fixture(scope="module")
def big():
    return _run(1)


def test_microbatches_equal_one_big_batch(big):
    mask = np.asarray(_batch()["loss_mask"])
    assert mask[0::2].sum() == 30 and mask[1::2].sum() == 7  # unequal: a mean of means would differ
    before, ref, ref_m = big
    _, got, got_m = _run(2)
    for k in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        assert_close(got_m[k], ref_m[k], composite=True, err_msg=k)
    assert float(ref_m["mtp_loss"]) > 0 and float(ref_m["balance_loss"]) > 0
    # The captured gradients (``grad_capture`` keeps the last gradient as its state).
    ref_g, got_g = nnx.to_flat_state(ref["opt_state"]), dict(nnx.to_flat_state(got["opt_state"]))
    assert len(ref_g) == len(got_g) > 0
    for path, g in ref_g:
        assert_close(got_g[path].get_value(), g.get_value(), composite=True, err_msg=str(path))
    assert_close(got_m["grad_norm"], ref_m["grad_norm"], composite=True)
    # The bias update sees the loads summed over both microbatches: the big batch's.
    np.testing.assert_array_equal(np.asarray(got_m["expert_load"]), np.asarray(ref_m["expert_load"]))
    moved = 0
    for (path, b0), (_, b1), (_, b2) in zip(
        nnx.to_flat_state(before["rest"]), nnx.to_flat_state(ref["rest"]), nnx.to_flat_state(got["rest"])
    ):
        np.testing.assert_array_equal(np.asarray(b2.get_value()), np.asarray(b1.get_value()), err_msg=str(path))
        moved += not np.array_equal(np.asarray(b1.get_value()), np.asarray(b0.get_value()))
    assert moved > 0
