"""The compiled train step with the layer options the pod config uses (``scan_layers``)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tests.util import tiny_config
from train.optimizer import default_optimizer_config, make_optimizer
from train.state import init_state
from train.step import make_train_step
from train.synthetic import synthetic_batches


def _batch() -> dict:
    return {k: jnp.asarray(v) for k, v in synthetic_batches(4, 16, 1)[0].items()}


def test_scanned_layers_train_step_runs_and_updates():
    """``scan_layers`` (nnx.scan over the MoE blocks) under jit + grad: this crashed with "Cannot
    extract graph node from different trace level" when the step merged the model without fresh
    Variables. Two steps, microbatches 2: finite losses, the parameters and router biases move."""
    cfg = tiny_config(vocab_size=264, scan_layers=True, n_layers=3, first_k_dense=1)
    tx = make_optimizer(default_optimizer_config(), 100)
    graphdef, state = init_state(cfg, tx, seed=0)
    train_cfg = ml_collections.ConfigDict(
        dict(mtp_loss_weight=0.3, balance_loss_alpha=1e-4, bias_update_rate=1e-3, microbatches=2)
    )
    step = jax.jit(make_train_step(graphdef, tx, train_cfg))
    before = jax.tree.map(np.asarray, state)
    for _ in range(2):
        state, metrics = step(state, _batch())
    assert np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 2 and int(state["skipped"]) == 0
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]))
    ]
    assert all(moved)
    assert not np.array_equal(jax.tree.leaves(before["rest"])[0], np.asarray(jax.tree.leaves(state["rest"])[0]))
