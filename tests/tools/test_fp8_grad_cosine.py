"""tools.fp8_grad_cosine's pinned routing: a MoE layer given other expert choices takes exactly
those (forward of one layer, 16 tokens: the pinning is what is under test here)."""

import jax
import numpy as np
from flax import nnx

from model.moe import MoE
from tests.util import tiny_config
from tools import fp8_grad_cosine as tool


def test_pinned_routing_sends_each_token_to_the_given_experts():
    cfg = tiny_config()
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model))  # [b, t, d]
    seg = np.ones((2, 8), np.int32)
    own_ids = []
    with tool._route_with(None, own_ids):
        own, _ = moe(x, seg)
    other = (own_ids[0] + 1) % cfg.n_routed_experts  # [m, k]: every choice moved to the next expert
    seen = []
    with tool._route_with([other], seen):
        moved, _ = moe(x, seg)
    assert np.array_equal(seen[0], other)
    assert not np.allclose(own, moved)  # the outputs came from the other experts
