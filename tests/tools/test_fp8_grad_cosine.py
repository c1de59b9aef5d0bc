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

    @jax.jit
    def forward(pinned):
        seen = []
        with tool._route_with(None if pinned is None else [pinned], seen):
            y, _ = moe(x, seg)
        return y, seen[0]  # [b, t, d], [m, k]

    own, ids = forward(None)
    other = (ids + 1) % cfg.n_routed_experts  # every choice moved to the next expert
    moved, ids_moved = forward(other)
    assert np.array_equal(ids_moved, other)
    assert not np.allclose(own, moved)  # the outputs came from the other experts
