import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train import optimizer as opt_lib


def _cfg(**kw):
    c = opt_lib.default_optimizer_config()
    c.update(kw)
    return c


def _lrs(cfg, total, steps):
    sched = opt_lib.make_schedule(cfg, total)
    return np.array([float(sched(s)) for s in steps])


def test_warmup_then_cosine():
    cfg = _cfg(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lr = _lrs(cfg, 110, [0, 4, 9, 10, 60, 110, 500])
    np.testing.assert_allclose(lr[:3], [0.1, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(lr[3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(lr[4], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)
    np.testing.assert_allclose(lr[5:], [0.1, 0.1], rtol=1e-6)


def test_constant_and_wsd():
    lr = _lrs(_cfg(lr=2.0, warmup_steps=4, schedule="constant"), 100, [0, 3, 4, 99, 1000])
    np.testing.assert_allclose(lr, [0.5, 2.0, 2.0, 2.0, 2.0], rtol=1e-6)
    cfg = _cfg(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    lr = _lrs(cfg, 100, [9, 10, 79, 80, 90, 100])  # decay over steps 80..100
    np.testing.assert_allclose(lr, [1.0, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_no_warmup_and_bad_config():
    np.testing.assert_allclose(_lrs(_cfg(lr=1.0, warmup_steps=0, schedule="constant"), 10, [0]), [1.0])
    with pytest.raises(ValueError, match="schedule"):
        opt_lib.make_schedule(_cfg(schedule="linear"), 10)
    with pytest.raises(ValueError, match="warmup"):
        opt_lib.make_schedule(_cfg(warmup_steps=-1), 10)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jnp.ones((3, 4)))
        self.scale = nnx.Param(jnp.ones((4,)))
        self.bias = nnx.BatchStat(jnp.zeros((4,)))  # stands in for the router bias: not a Param


def test_decay_only_matrices_on_nnx_state():
    # Zero gradients: the only change is weight decay, so only ndim >= 2 leaves move.
    cfg = _cfg(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1)
    tx = opt_lib.make_optimizer(cfg, 10)
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    assert "bias" not in params
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"].get_value(), 1.0 - 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(new["scale"].get_value(), 1.0, rtol=0)


def test_clip_before_adam():
    """The global-norm clip acts on the raw gradient, before Adam. Gradient 100 in 4 entries (norm
    200) clipped to norm 1 is 0.5 each; Adam's first moment then holds (1 - b1) * 0.5 = 0.05 (10
    unclipped). Adam's first update is ~lr * sign(g) whatever the scale, so that alone cannot see the
    clip; with eps = 1 it can: -lr * 0.5 / (0.5 + 1) = -1/3 clipped, -100/101 unclipped, and a clip
    moved after Adam would clip -100/101 (norm 1.98) to -0.5."""
    params = {"a": jnp.zeros((2, 2))}
    grads = {"a": jnp.full((2, 2), 100.0)}

    def first_step(**kw):
        cfg = _cfg(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, **kw)
        tx = opt_lib.make_optimizer(cfg, 10)
        updates, state = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["a"]), np.asarray(optax.tree_utils.tree_get(state, "mu")["a"])

    upd, mu = first_step(clip_norm=1.0)
    np.testing.assert_allclose(mu, 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(upd, -1.0, rtol=1e-5)  # sign-like first step: a clip after Adam would halve it
    upd, mu = first_step(clip_norm=1.0, eps=1.0)
    np.testing.assert_allclose(upd, -1.0 / 3.0, rtol=1e-5)
    upd, mu = first_step(clip_norm=0.0, eps=1.0)  # 0 disables clipping
    np.testing.assert_allclose(mu, 0.1 * 100.0, rtol=1e-6)
    np.testing.assert_allclose(upd, -100.0 / 101.0, rtol=1e-5)


def test_warmup_longer_than_the_run_is_clipped_with_a_warning():
    """configs/moe_tiny.py (warmup 30) with --config.train.steps=4: warm up over the 4 steps."""
    with pytest.warns(UserWarning, match="warmup_steps=30 exceeds the run's 4 steps"):
        lr = _lrs(_cfg(lr=1.0, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1), 4, [0, 1, 2, 3])
    np.testing.assert_allclose(lr, [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # the run's 4 steps: all warmup
    with pytest.warns(UserWarning, match="warmup_steps=30"):
        opt_lib.make_optimizer(_cfg(warmup_steps=30), 4)
