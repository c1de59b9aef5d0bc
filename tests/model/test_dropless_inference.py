"""Capacity is a training-time choice: evaluation and generation are dropless, so a row's logits do
not depend on the other rows of its batch, even for a model configured with a capacity factor."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import decode
from model.balance import routers
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config


def _crowded_model():
    """capacity_factor 1.0 and every router biased towards experts 0 and 1: whenever capacity is
    applied, most assignments overflow, and which ones depends on the whole batch."""
    cfg = tiny_config(capacity_factor=1.0, n_group=1, topk_group=1, mtp_depth=0, max_seq_len=48)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for r in routers(model):
        r.bias[...] = jnp.zeros(cfg.n_routed_experts).at[:2].set(100.0)
    return model


def test_eval_forward_is_dropless_and_batch_independent():
    model = _crowded_model()
    ids = jax.random.randint(jax.random.key(0), (3, 12), 0, model.cfg.vocab_size)
    out = model(ids)
    assert int(out.aux["dropped"]) == 0
    for i in range(ids.shape[0]):
        assert_close(out.logits[i], model(ids[i:i + 1]).logits[0], composite=True, err_msg=f"row {i}")
    # The same batch with train=True does drop (so the comparison above is not vacuous).
    trained = model(ids, train=True)
    assert int(trained.aux["dropped"]) > 0
    assert np.abs(np.asarray(trained.logits[0]) - np.asarray(model(ids[:1], train=True).logits[0])).max() > 1e-3


def test_generation_is_batch_independent():
    """Greedy decoding of two prompts together gives each prompt's tokens decoded alone (a 2-row
    decode step with capacity would keep ceil(1.0 * 2 * 2 / 8) = 1 assignment per expert)."""
    model = _crowded_model()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, model.cfg.vocab_size, n)) for n in (5, 9)]
    together = decode.generate(model, prompts, max_new_tokens=4)
    alone = [decode.generate(model, [p], max_new_tokens=4)[0] for p in prompts]
    assert together == alone
