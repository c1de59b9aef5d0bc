"""GRPO on a mesh (8 fake CPU devices, tests/conftest.py) gives the 1-device run: the same samples,
rewards and held-out accuracy, and the same losses, KL, entropy and gradient norms, step by step.

beta > 0 and mu = 2, so the reference and the stored old log-probs live on the mesh too. The
samples agreeing exactly after the first update is a check on the updated parameters as well: the
second and third steps sample from them (threefry keys draw the same bits whatever the sharding).

A dense reward (``_bytesum``: every group has reward variance) gives every step a policy gradient.
Adam's eps is raised to 1e-4 (weight decay off): with eps 1e-8 its first update is lr * sign(g) for
every parameter, so a gradient that is pure rounding noise (~1e-10, sums reassociated across
devices) moves a parameter by +-lr on one mesh and -+lr on the other (tests/train/
test_parallel_equivalence.py meets the same with a small learning rate); with eps 1e-4 such a
gradient moves it by ~1e-6 lr, while the real gradients (~1e-4 per element) keep Adam's steps."""

import json

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.tolerances import assert_close
from tests.train.mesh_run import relative_error
from tests.train.rl.test_trainer import tiny_rl
from train import sharding
from train.rl import rewards, trainer

_EXACT = ("reward_mean", "accuracy", "completion_length_mean", "completion_length_max", "heldout_accuracy")
_CLOSE = ("loss", "kl", "entropy", "grad_norm", "ratio_mean", "clip_fraction")


def _bytesum(completion, example):
    return sum(completion.encode()) % 7 / 7


def _run(tmp_path, name, monkeypatch, **mesh):
    monkeypatch.setitem(rewards.REWARDS, "bytesum", _bytesum)
    c = tiny_rl(beta=0.1, updates_per_batch=2, rewards="bytesum=1,format=0.5")
    c.train.steps = 3
    c.optimizer.update(dict(eps=1e-4, weight_decay=0.0))
    c.mesh.update(mesh)
    seen = []
    generate = trainer.generation.generate_details

    def spy(model, prompts, **kw):  # where the sampler's rows and the policy's weights live
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        seen.append((kw["rows"].spec, {p.sharding.spec for p in params}, len(prompts)))
        return generate(model, prompts, **kw)

    monkeypatch.setattr(trainer.generation, "generate_details", spy)
    trainer.grpo_train(c, str(tmp_path / name))
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return lines, seen


def test_data_fsdp_mesh_matches_one_device(tmp_path, monkeypatch):
    one, _ = _run(tmp_path, "one", monkeypatch)
    got, seen = _run(tmp_path, "mesh", monkeypatch, data=2, fsdp=4)
    batch_spec = P(("data", "fsdp", "expert"))
    assert all(rows == batch_spec for rows, _, _ in seen), seen
    assert all(any("fsdp" in str(spec) for spec in specs) for _, specs, _ in seen), seen  # weights split
    assert [r["step"] for r in got] == [r["step"] for r in one] == [0, 1, 2, 3, 3]
    for a, b in zip(got, one):
        for k in _EXACT:
            if k in b:
                assert a[k] == b[k], (b["step"], k, a[k], b[k])
        for k in _CLOSE:
            if k in b:
                assert_close(a[k], b[k], composite=True, err_msg=f"step {b['step']} {k}")
        if "grad_norm" in b:
            assert relative_error(a["grad_norm"], b["grad_norm"]) <= 1e-4
    assert max(r.get("kl", 0) for r in one) > 1e-3  # the policy moved away from the reference
    assert min(r["grad_norm"] for r in one if "grad_norm" in r) > 1e-2  # every step has a policy gradient


def test_rollout_rows_must_split_over_the_mesh(tmp_path):
    c = tiny_rl(prompts_per_step=3, group_size=2)  # 6 rows over 8 devices
    c.mesh.update(dict(data=2, fsdp=4))
    try:
        trainer.grpo_train(c, str(tmp_path / "w"))
    except sharding.MeshConfigError as e:
        assert "6 rollout rows do not split over mesh.data x mesh.fsdp x mesh.expert = 8" in str(e)
    else:
        raise AssertionError("6 rows on 8 devices were not refused")
    assert not (tmp_path / "w").exists()
