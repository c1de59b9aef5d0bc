"""Capacity is a training-time choice: evaluation and generation are dropless, so a row's logits do
not depend on the other rows of its batch, even for a model configured with a capacity factor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode, generation
from model.balance import routers
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config


@pytest.fixture(scope="module")
def crowded_model():
    """capacity_factor 1.0 and every router biased towards experts 0 and 1: whenever capacity is
    applied, most assignments overflow, and which ones depends on the whole batch."""
    cfg = tiny_config(capacity_factor=1.0, n_group=1, topk_group=1, mtp_depth=0, max_seq_len=48)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for r in routers(model):
        r.bias[...] = jnp.zeros(cfg.n_routed_experts).at[:2].set(100.0)
    return model


@functools.partial(nnx.jit, static_argnames="train")
def _forward(model, ids, train=False):
    out = model(ids, train=train)
    return out.logits, out.aux["dropped"]


def test_eval_forward_is_dropless_and_batch_independent(crowded_model):
    ids = jax.random.randint(jax.random.key(0), (3, 8), 0, crowded_model.cfg.vocab_size)
    logits, dropped = _forward(crowded_model, ids)
    assert int(dropped) == 0
    for i in range(ids.shape[0]):
        assert_close(logits[i], _forward(crowded_model, ids[i : i + 1])[0][0], composite=True, err_msg=f"row {i}")
    # The same batch in a training call does drop (so the comparison above is not vacuous).
    assert int(_forward(crowded_model, ids, train=True)[1]) > 0


@pytest.mark.parametrize(
    "generate", [decode.generate_reference, generation.generate], ids=["reference_loop", "device_loop"]
)
def test_generation_is_batch_independent(crowded_model, generate):
    """Greedy decoding of two prompts together gives each prompt's tokens decoded alone (a 2-row
    decode step with capacity would keep ceil(1.0 * 2 * 2 / 8) = 1 assignment per expert)."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, crowded_model.cfg.vocab_size, n)) for n in (5, 9)]
    together = generate(crowded_model, prompts, max_new_tokens=4)
    alone = [generate(crowded_model, [p], max_new_tokens=4)[0] for p in prompts]
    assert together == alone
