"""The 671B pod's training configuration in miniature (configs/deepseek_v3_671b_pod.py), 8 fake CPU
devices against one device with the same settings.

Everything the pod combines, at toy size: mesh fsdp=2 x expert=2 x tensor=2 (the pod's 16 x 64 x 2),
capacity factor 2.0, 2 microbatches (the pod's 15), scanned MoE layers, remat "full", one MTP
module, bf16 compute with f32 master weights and Adam moments. Two steps (taken at identical
parameters: lr 0 at step 0): losses and per-tensor gradients against the 1-device run, at the bf16
tolerances of ``tests/tolerances.POD_MINIATURE`` (the same test in f32 agrees to 1e-6: the
tolerances are bf16 rounding only). The norm of each gradient is compared on its own, so a constant
scale error (a doubled psum in a ``shard_map`` backward) cannot hide in bf16's noise.

Capacity is applied per device to its own tokens (``model/moe.py``), so the 1-device run keeps the
same assignments only where no expert overflows: the test asserts that no assignment drops on
either side (at a third step, one does on the mesh: the router's load is skewed within a sequence,
and a device holds one); capacity with drops on a mesh is ``tests/train/test_ep_capacity.py``.
"""

import numpy as np

from configs import deepseek_v3_671b_pod, moe_tiny
from tests.tolerances import POD_MINIATURE
from tests.train.mesh_run import leaves, relative_error, run_steps

STEPS = GRAD_STEPS = 2


def pod_miniature(mesh: bool):
    pod = deepseek_v3_671b_pod.get_config()
    c = moe_tiny.get_config()
    c.data.seq_len = 128
    c.train.global_batch_size = 8  # 4 batch shards x 2 microbatches x 1 row
    c.train.steps = 100
    c.optimizer.warmup_steps = 10
    c.model.d_model = 32
    c.model.n_layers = 3  # 1 dense + 2 scanned MoE blocks
    c.model.mtp_depth = pod.model.mtp_depth
    c.model.capacity_factor = pod.model.capacity_factor
    c.model.scan_layers = True
    c.model.remat = "full"
    c.model.dtype = pod.model.dtype
    c.model.param_dtype = pod.model.param_dtype
    c.train.microbatches = 2
    c.train.mtp_loss_weight = pod.train.mtp_loss_weight
    if mesh:
        c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 2, 2, 2
    return c


def test_pod_miniature_matches_one_device():
    c = pod_miniature(mesh=True)
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32") and c.model.capacity_factor == 2.0
    ref, got = run_steps(pod_miniature(mesh=False), STEPS, GRAD_STEPS), run_steps(c, STEPS, GRAD_STEPS)
    m, m_ref = got["metrics"], ref["metrics"]
    assert m["dropped_tokens"].tolist() == m_ref["dropped_tokens"].tolist() == [0.0] * STEPS
    np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=POD_MINIATURE["loss"])
    np.testing.assert_allclose(m["mtp_loss"], m_ref["mtp_loss"], rtol=POD_MINIATURE["loss"])
    np.testing.assert_allclose(m["grad_norm"], m_ref["grad_norm"], rtol=POD_MINIATURE["grad_norm"])
    for step, (g, g_ref) in enumerate(zip(got["grads"], ref["grads"])):
        for (path, a), (_, b) in zip(leaves(g), leaves(g_ref)):
            where = f"step {step} grad {path}"
            assert a.dtype == b.dtype == np.float32, where  # gradients of the f32 masters
            scale = np.linalg.norm(a) / np.linalg.norm(b)
            assert abs(scale - 1) <= POD_MINIATURE["grad_norm"], (where, "norm ratio", scale)
            assert relative_error(a, b) <= POD_MINIATURE["grad"], (where, relative_error(a, b))
