"""Parallel training equals single-device training (8 fake CPU devices, tests/conftest.py).

Three optimizer steps of a narrow moe_tiny (d_model 64, 1 dense + 1 MoE block, seq_len 32,
batch 8) on each mesh give the losses and parameters of the 1-device run, with no
assignment dropped. The steps run through the trainer's own pieces: ``sharding.create`` for the
state, ``sharded_train_step`` with the state's shardings, ``sharding.global_batch``.

Warmup spans the three steps (lr 0, 3e-4, 6e-4): Adam's update lr * m / (sqrt(v) + eps) turns a
~1e-7 relative change in a near-zero gradient (sums reassociated across devices) into a change of
up to lr in that parameter, so the comparison is made at a learning rate where that is in f32's
composite tolerance instead of at moe_tiny's full lr.
"""

import re

import jax
import numpy as np
import pytest

from configs import moe_tiny
from model.config import ModelConfig
from tests.tolerances import assert_close
from train import sharding
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state
from train.step import sharded_train_step
from train.synthetic import synthetic_batches as _synthetic

MESHES = [
    dict(data=8),
    dict(fsdp=8),
    dict(data=2, expert=4),
    dict(data=2, expert=2, tensor=2),
    dict(fsdp=2, expert=2, tensor=2),
]
STEPS = 3


def small_config(**mesh):
    c = moe_tiny.get_config()
    c.data.seq_len = 32
    c.train.global_batch_size = 8
    c.train.steps = 100
    c.optimizer.warmup_steps = 10
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.mtp_depth = 0  # compile time (CI budget); MTP's block is the same MoE block
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def synthetic_batches(c, n: int, seed: int = 0) -> list[dict]:
    return _synthetic(c.train.global_batch_size, c.data.seq_len, n, seed)


_RUNS = {}


def train(**mesh_sizes) -> dict:
    """STEPS steps on ``mesh_sizes`` (memoised: the HLO test reuses the EP run's compilation)."""
    key = tuple(sorted(mesh_sizes.items()))
    if key in _RUNS:
        return _RUNS[key]
    c = small_config(**mesh_sizes)
    mesh = sharding.make_mesh(c.mesh)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    sharding.check_fits(dict(zip(mesh.axis_names, mesh.axis_sizes)), cfg, global_batch_size=c.train.global_batch_size)
    tx = make_optimizer(c.optimizer, c.train.steps)
    graphdef, abstract = abstract_state(cfg, tx, c.train.seed)
    state_sh = sharding.tree_shardings(abstract, mesh)
    state = sharding.create(lambda: init_state(cfg, tx, c.train.seed)[1], state_sh, mesh)
    step = sharded_train_step(graphdef, tx, c.train, mesh, state_sh, donate=False)
    batches = [sharding.global_batch(b, mesh) for b in synthetic_batches(c, STEPS)]
    compiled = step.lower(state, batches[0]).compile()
    losses, dropped = [], []
    for b in batches:
        with jax.set_mesh(mesh):
            state, m = compiled(state, b)
        losses.append(float(m["loss"]))
        dropped.append(float(m["dropped_tokens"]))
    _RUNS[key] = dict(
        losses=np.array(losses),
        dropped=dropped,
        hlo=compiled.as_text(),
        params=jax.tree.map(np.asarray, state["params"]),
        rest=jax.tree.map(np.asarray, state["rest"]),
    )
    return _RUNS[key]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_matches_single_device(mesh):
    ref, got = train(), train(**mesh)
    assert got["dropped"] == [0.0] * STEPS
    assert_close(got["losses"], ref["losses"], composite=True)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got["params"])[0], jax.tree.leaves(ref["params"])):
        assert_close(a, b, composite=True, err_msg=jax.tree_util.keystr(path))
    # Router biases moved by the global-batch loads: identical on every device, equal to 1 device.
    for a, b in zip(jax.tree.leaves(got["rest"]), jax.tree.leaves(ref["rest"])):
        assert_close(a, b)


def test_expert_parallel_hlo_uses_all_to_all_and_keeps_experts_sharded():
    run = train(data=2, expert=4)
    hlo = run["hlo"]
    assert re.search(r"\ball-to-all(-start)?\(", hlo), "no all-to-all in the expert-parallel step"
    full = run["params"]["moe_blocks"][0]["mlp"]["w_gate"].get_value().shape  # (16, 64, 128)
    dims = {",".join(map(str, s)) for s in (full, (full[0], full[2], full[1]))}  # w_gate/w_up, w_down
    gathered = re.findall(r"= f32\[([\d,]+)\][^\n]*? all-gather(?:-start)?\(", hlo)
    assert not dims & set(gathered), f"full routed-expert weights all-gathered: {dims & set(gathered)}"
