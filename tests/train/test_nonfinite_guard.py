"""The train step's non-finite guard (``train/step.py``): one non-finite batch changes nothing.

Between two finite steps, one step sees a batch whose loss is NaN (a NaN loss weight on one
token): its parameters, Adam state and router biases must come out bitwise unchanged (the
router loads of that batch are finite, so an unguarded bias update would show), only ``step``
and ``skipped`` advance, and the next finite step trains on as if the bad batch never came.
"""

import jax
import ml_collections
import numpy as np

from tests.util import tiny_config
from train.optimizer import default_optimizer_config, make_optimizer
from train.state import init_state
from train.step import make_train_step


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, 64, (2, 13)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    seg = np.ones((2, 12), np.int32)
    return dict(
        inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg, positions=pos, loss_mask=np.ones((2, 12), np.float32)
    )


def _flat(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_flat(a), _flat(b), strict=True))


def _differs_everywhere(a, b) -> bool:
    return all(not np.array_equal(x, y) for x, y in zip(_flat(a), _flat(b), strict=True))


def test_one_nonfinite_batch_changes_nothing_and_training_continues():
    cfg = tiny_config(n_layers=2, mtp_depth=1)
    opt = default_optimizer_config()
    opt.warmup_steps = 0
    tx = make_optimizer(opt, 10)
    graphdef, state = init_state(cfg, tx, seed=0)
    train_cfg = ml_collections.ConfigDict(
        dict(mtp_loss_weight=0.3, balance_loss_alpha=1e-4, bias_update_rate=1e-3, microbatches=1)
    )
    step = jax.jit(make_train_step(graphdef, tx, train_cfg))
    state, m = step(state, _batch(0))  # a finite step first: Adam's moments are not zero
    assert bool(m["finite"]) and int(state["skipped"]) == 0

    bad = _batch(1)
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][1, 5] = np.nan
    after, m = step(state, bad)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert np.isfinite(np.asarray(m["expert_load"])).all() and float(np.asarray(m["expert_load"]).sum()) > 0
    for part in ("params", "opt_state", "rest", "rng"):
        assert _same(after[part], state[part]), part
    assert int(after["step"]) == 2 and int(after["skipped"]) == 1

    again, m = step(after, _batch(2))
    assert bool(m["finite"]) and int(again["skipped"]) == 1 and int(again["step"]) == 3
    assert all(np.isfinite(x).all() for x in _flat(again["params"]))
    # The finite step moves every parameter, Adam's moments and the router biases.
    assert _differs_everywhere(again["params"], after["params"])
    assert _differs_everywhere(again["opt_state"], after["opt_state"])
    assert _differs_everywhere(again["rest"], after["rest"])
