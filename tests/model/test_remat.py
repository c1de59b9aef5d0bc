"""Every remat policy ModelConfig accepts runs, and gives the gradients of ``remat="none"``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from model.config import _REMAT
from model.loss import token_cross_entropy
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config

# scan_layers: the dense block runs outside nnx.scan, the MoE blocks inside it (both remat paths).
_CFG = dict(scan_layers=True, n_layers=2, first_k_dense=1, mtp_depth=0)


def _loss_and_grads(remat: str):
    cfg = tiny_config(remat=remat, **_CFG)
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 12)), jnp.int32)
    targets = jnp.roll(ids, -1, axis=1)

    def loss_fn(params, rest):
        out = nnx.merge(graphdef, params, rest, copy=True)(ids)  # as train/step.py does
        return token_cross_entropy(out.logits, targets).mean() + out.aux["balance_loss"]

    jaxpr = jax.make_jaxpr(loss_fn)(params, rest)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, rest)
    return jaxpr, loss, grads


_REFERENCE = {}


def _reference():
    if not _REFERENCE:
        _REFERENCE["none"] = _loss_and_grads("none")
    return _REFERENCE["none"]


def _remat_eqns(jaxpr) -> int:
    """Number of remat (``checkpoint``) regions anywhere in ``jaxpr``."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat", "remat2")  # jax.checkpoint's name by version
        for sub in jax_core.jaxprs_in_params(eqn.params):
            n += _remat_eqns(sub)
    return n


@pytest.mark.parametrize("remat", [r for r in _REMAT if r != "none"])
def test_remat_policy_gradients_equal_no_remat(remat):
    ref_jaxpr, ref_loss, ref_grads = _reference()
    jaxpr, loss, grads = _loss_and_grads(remat)
    assert _remat_eqns(ref_jaxpr.jaxpr) == 0
    assert _remat_eqns(jaxpr.jaxpr) == 2  # the dense block's, and the scanned MoE block's
    assert_close(loss, ref_loss, composite=True)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert len(flat) == len(ref_flat)
    for path, g in flat:
        assert_close(g.get_value(), ref_flat[path].get_value(), composite=True, err_msg=str(path))
