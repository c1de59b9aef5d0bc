"""tools/bench_decode.py: the bytes a decode step reads (its bandwidth bound's numerator)."""

import numpy as np
from flax import nnx

from model.transformer import Transformer
from tests.model.test_decode import CFG
from tools.bench_decode import step_bytes


def test_step_bytes_counts_only_routed_experts_partially():
    """Batch 1 reads every weight once except the embedding table (one row) and the routed experts
    (k of E); the dense FFN and the shared expert, also named w_gate / w_up / w_down, in full."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    e, k, d = CFG.n_routed_experts, CFG.n_experts_per_tok, CFG.d_model
    full = routed = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "mtp":
            continue
        a = v.get_value()
        full += a.nbytes
        if path[0] == "moe_blocks" and path[-2] == "mlp" and a.shape[0] == e:  # [E, d, f] / [E, f, d]
            routed += a.nbytes
    embed = model.embed[...].nbytes
    assert routed > 0
    expect = full - embed + d * 4 - routed + routed * k // e
    assert step_bytes(model, 1, 0, False) == expect
    cache = 7 * CFG.n_layers * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 4  # 7 cached tokens, f32
    assert step_bytes(model, 1, 7, False) == expect + cache
    assert step_bytes(model, 8, 0, False) > expect  # more rows touch more experts
    assert np.isclose(step_bytes(model, 64, 0, False), full - embed + 64 * d * 4, rtol=1e-3)  # ~all experts
