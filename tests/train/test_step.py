"""The compiled train step with the layer options the pod config uses (``scan_layers``, remat)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tests.tolerances import assert_close
from tests.util import grad_capture, tiny_config
from train.state import init_state
from train.step import make_train_step
from train.synthetic import synthetic_batches


def _batch() -> dict:
    return {k: jnp.asarray(v) for k, v in synthetic_batches(4, 16, 1)[0].items()}


def _stacked_like(scanned, unscanned):
    """``unscanned``'s values in ``scanned``'s layout: moe_blocks.{i}.x -> moe_blocks.x[i]."""
    src = {path: v.get_value() for path, v in nnx.to_flat_state(unscanned)}
    flat = []
    for path, var in nnx.to_flat_state(scanned):
        if path[0] == "moe_blocks":
            n = var.get_value().shape[0]
            val = jnp.stack([src[(path[0], i) + path[1:]] for i in range(n)])
        else:
            val = src[path]
        flat.append((path, var.replace(val)))
    return nnx.from_flat_state(flat)


def test_scanned_and_remat_train_step_equals_unscanned():
    """The same weights as a Python loop of blocks (remat none) and as one scanned, remat="full"
    stack: one train step (2 microbatches) gives the same losses, gradients and router biases.
    (``scan_layers`` under jit + grad once crashed with "Cannot extract graph node from different
    trace level", when the step merged the model without fresh Variables.)"""
    base = dict(vocab_size=264, n_layers=3, first_k_dense=1, mtp_depth=0)  # MTP: test_microbatch.py
    tx = grad_capture()  # the state keeps the accumulated gradient
    train_cfg = ml_collections.ConfigDict(
        dict(mtp_loss_weight=0.3, balance_loss_alpha=0.1, bias_update_rate=1e-3, microbatches=2)
    )
    g_loop, loop = init_state(tiny_config(**base), tx, seed=0)
    g_scan, scan = init_state(tiny_config(scan_layers=True, remat="full", **base), tx, seed=1)
    scan = {
        **scan,
        "params": _stacked_like(scan["params"], loop["params"]),
        "rest": _stacked_like(scan["rest"], loop["rest"]),
    }
    scan["opt_state"] = jax.tree.map(jnp.zeros_like, scan["params"])
    batch = _batch()
    loop_new, loop_m = jax.jit(make_train_step(g_loop, tx, train_cfg))(loop, batch)
    scan_new, scan_m = jax.jit(make_train_step(g_scan, tx, train_cfg))(scan, batch)
    assert bool(scan_m["finite"]) and int(scan_new["skipped"]) == 0
    for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm"):
        assert_close(scan_m[k], loop_m[k], composite=True, err_msg=k)
    np.testing.assert_array_equal(np.asarray(scan_m["expert_load"]), np.asarray(loop_m["expert_load"]))
    want_g = dict(nnx.to_flat_state(_stacked_like(scan_new["opt_state"], loop_new["opt_state"])))
    for path, g in nnx.to_flat_state(scan_new["opt_state"]):
        assert_close(g.get_value(), want_g[path].get_value(), composite=True, err_msg=str(path))
        assert np.asarray(g.get_value()).any(), path  # every parameter gets a gradient
    want_b = dict(nnx.to_flat_state(_stacked_like(scan_new["rest"], loop_new["rest"])))
    for path, b in nnx.to_flat_state(scan_new["rest"]):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(want_b[path].get_value()), str(path))
    moved = lambda a, b: not np.array_equal(np.asarray(jax.tree.leaves(a)[0]), np.asarray(jax.tree.leaves(b)[0]))
    assert moved(scan_new["rest"], scan["rest"])  # the scanned router biases took the sign update
