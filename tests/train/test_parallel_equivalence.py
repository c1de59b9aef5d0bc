"""Parallel training equals single-device training (8 fake CPU devices, tests/conftest.py).

Three optimizer steps of a narrow moe_tiny (d_model 64, 1 dense + 1 MoE block, one MTP module,
seq_len 32, batch 8) on each mesh give the gradients, losses and parameters of the 1-device run,
with no assignment dropped; so does a narrow llama_tiny (dense: grouped-query attention with 4 query
heads on 2 KV heads, 2 SwiGLU blocks, no MTP), whose KV heads the tensor axis splits. The steps run through the trainer's own pieces: ``sharding.create``
for the state, ``sharded_train_step`` with the state's shardings, ``sharding.global_batch``.

Gradients are compared directly, per tensor (Adam's update is nearly lr * sign(g), so parameters
after a few steps do not see a constant scale error in a gradient, e.g. a doubled psum in a
``shard_map`` backward): ``mesh_run.record_grads`` in front of the optimizer keeps each step's raw
gradients in the optimizer state. The first two steps' gradients are taken at identical parameters (lr 0 at
step 0), so they are compared at f32's composite tolerance, and also by each tensor's relative
error norm, which does not let a tensor of small gradients hide under the absolute tolerance. The
balance-loss term (alpha = 1e-4 of the loss) is compared at its own scale, divided by alpha.

Warmup spans the three steps (lr 0, 3e-4, 6e-4): Adam's update lr * m / (sqrt(v) + eps) turns a
~1e-7 relative change in a near-zero gradient (sums reassociated across devices) into a change of
up to lr in that parameter, so the comparison is made at a learning rate where that is in f32's
composite tolerance instead of at moe_tiny's full lr.
"""

import jax
import pytest

from configs import llama_tiny, moe_tiny
from tests import hlo
from tests.tolerances import assert_close
from tests.train.mesh_run import leaves, relative_error, run_steps

MESHES = [
    dict(data=8),
    dict(fsdp=8),
    dict(data=2, expert=4),
    dict(data=2, expert=2, tensor=2),
    dict(fsdp=2, expert=2, tensor=2),
    dict(data=4, tensor=2),
]
STEPS = 3
GRAD_STEPS = 2  # steps whose gradients are taken at the same parameters on every mesh (lr 0 at step 0)


def small_config(dense: bool = False, **mesh):
    c = (llama_tiny if dense else moe_tiny).get_config()
    c.data.seq_len = 32
    c.train.global_batch_size = 8
    c.train.steps = 100
    c.optimizer.warmup_steps = 10
    c.model.d_model = 64
    c.model.n_layers = 2
    if dense:
        c.model.first_k_dense, c.model.head_dim = 2, 16
        # Adam's first steps move a parameter by up to lr whatever its gradient's size, so a near-zero
        # gradient whose sign the mesh's summation order flips moves it by up to 2 lr (measured: one
        # embedding entry 4e-4 apart after 3 steps at llama_tiny's lr 6e-3 on data=2,expert=2,tensor=2,
        # every gradient equal within 1e-4). lr 3e-4 scales that 20x down, into the composite
        # tolerance; the gradients themselves are compared directly, at every lr.
        c.optimizer.lr = 3e-4
    else:
        c.model.mtp_depth = 1
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


_RUNS = {}


def train(dense: bool = False, **mesh_sizes) -> dict:
    """STEPS steps on ``mesh_sizes`` (memoised: the HLO test reuses the EP run's compilation)."""
    key = (dense,) + tuple(sorted(mesh_sizes.items()))
    if key not in _RUNS:
        _RUNS[key] = run_steps(small_config(dense, **mesh_sizes), STEPS, GRAD_STEPS)
    return _RUNS[key]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.parametrize("dense", [False, True], ids=["moe_tiny", "llama_tiny"])
def test_matches_single_device(mesh, dense):
    ref, got = train(dense), train(dense, **mesh)
    assert got["metrics"]["dropped_tokens"].tolist() == [0.0] * STEPS
    for step, (g, g_ref) in enumerate(zip(got["grads"], ref["grads"])):
        for (path, a), (_, b) in zip(leaves(g), leaves(g_ref)):
            where = f"step {step} grad {path}"
            assert_close(a, b, composite=True, err_msg=where)
            assert relative_error(a, b) <= 1e-4, (where, relative_error(a, b))
    m, m_ref = got["metrics"], ref["metrics"]
    for name in ("grad_norm", "loss", "main_loss", "mtp_loss"):
        assert_close(m[name], m_ref[name], composite=True, err_msg=name)
    # The balance term at its own scale: alpha * L_bal with L_bal ~ 1 (eq. 17-20).
    assert_close(m["balance_loss"] / got["alpha"], m_ref["balance_loss"] / ref["alpha"], composite=True)
    if not dense:
        assert m_ref["mtp_loss"].min() > 0 and m_ref["balance_loss"].min() > 0
    for (path, a), (_, b) in zip(leaves(got["params"]), leaves(ref["params"])):
        assert_close(a, b, composite=True, err_msg=path)
    # Router biases moved by the global-batch loads: identical on every device, equal to 1 device.
    for a, b in zip(jax.tree.leaves(got["rest"]), jax.tree.leaves(ref["rest"])):
        assert_close(a, b)


def test_expert_parallel_hlo_uses_all_to_all_and_keeps_experts_sharded():
    """Read from the compiled module's collectives (``tests/hlo.py``), sync or async: the tokens
    travel by all-to-all within each expert group of the mesh, and no all-gather rebuilds a full
    routed-expert weight."""
    run = train(data=2, expert=4)
    mesh = run["mesh"]
    ops = hlo.collectives(run["hlo"], mesh.size)
    expert_groups = hlo.axis_groups(mesh.devices.shape, (mesh.axis_names.index("expert"),))
    d_model = run["params"]["embed"].get_value().shape[1]
    a2a = [c for c in ops if c.op == "all-to-all"]
    tokens = [c for c in a2a if any(dims[-1:] == (d_model,) for _, dims in c.outputs)]
    assert tokens, f"no all-to-all of [rows, d_model={d_model}] activations: {[c.text[:160] for c in a2a]}"
    assert all(c.groups == expert_groups for c in tokens), [c.groups for c in tokens]
    full = run["params"]["moe_blocks"][0]["mlp"]["w_gate"].get_value().shape  # [e, d, f]
    dims = {full, (full[0], full[2], full[1])}  # w_gate / w_up, w_down
    gathered = [c.text[:200] for c in ops if c.op == "all-gather" and dims & {d for _, d in c.outputs}]
    assert not gathered, f"full routed-expert weights all-gathered: {gathered}"


def test_hlo_reader_sees_async_tuple_outputs_and_every_group_format():
    """The forms a GPU/TPU module prints (async all-gather-start with a tuple result) and the three
    replica-group formats (lines as XLA prints them; the CPU backend's from the run above)."""
    text = """
  %ags = (f32[4,64,128]{2,1,0}, f32[16,64,128]{2,1,0}) all-gather-start(f32[4,64,128]{2,1,0} %p), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[16,64,128]{2,1,0} all-gather-done((f32[4,64,128]{2,1,0}, f32[16,64,128]{2,1,0}) %ags)
  %a2a = (s32[128]{0}, s32[128]{0}) all-to-all(%x, %y), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}
  ROOT %ar = f32[64,40]{1,0} all-reduce(%z), channel_id=10, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, to_apply=%add
  %rs = f32[2,8]{1,0} reduce-scatter(%w), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
"""
    ops = hlo.collectives(text, 8)
    assert [c.op for c in ops] == ["all-gather", "all-to-all", "all-reduce", "reduce-scatter"]
    assert ops[0].outputs == (("f32", (16, 64, 128)),)
    assert ops[1].outputs == (("s32", (128,)),) * 2
    assert ops[0].groups == hlo.axis_groups((2, 4), (1,)) == {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert ops[1].groups == ops[3].groups == hlo.axis_groups((2, 4), (0,)) == {(0, 4), (1, 5), (2, 6), (3, 7)}
    assert ops[2].groups == {(0, 1, 2, 3), (4, 5, 6, 7)}
