"""The logical-axis rules table, the mesh from ``config.mesh``, and the refusals (nothing compiles)."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from train import sharding
from train.optimizer import default_optimizer_config, make_optimizer
from train.state import abstract_state, init_state


def _mesh_cfg(**sizes):
    return ml_collections.ConfigDict({a: sizes.get(a, 1) for a in sharding.MESH_AXES})


def test_rules_table_names_only_mesh_axes():
    for logical, mesh_axes in sharding.RULES.items():
        assert set(mesh_axes) <= set(sharding.MESH_AXES), logical


def test_mesh_resolves_minus_one_and_default_is_one_device():
    assert sharding.mesh_shape(_mesh_cfg(data=-1, expert=2), 8) == dict(data=4, fsdp=1, expert=2, tensor=1)
    mesh = sharding.make_mesh(_mesh_cfg())
    assert mesh.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _assert_mesh(mesh, shape, devices):
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_mesh_falls_back_to_split_physical_axes(monkeypatch):
    """Where ``jax.make_mesh`` cannot lay the axes on whole torus axes (the 1x16x64x2 pod mesh on a
    v5p 8x16x16 torus), the mesh is still built. CPU devices have no torus: mimic the failure."""

    def fail(*args, **kwargs):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 3 of size 2")

    monkeypatch.setattr(jax, "make_mesh", fail)
    mesh = sharding.make_mesh(_mesh_cfg(fsdp=2, expert=2, tensor=2))
    _assert_mesh(mesh, (1, 2, 2, 2), jax.devices())


def test_mesh_on_a_tpu_torus_needing_split_axes():
    """The real failure, on a v5p:2x4x4 torus (needs libtpu: /work/tpuvenv, see test_tpu_compile)."""
    pytest.importorskip("libtpu", reason="libtpu not installed: TPU topologies need jax[tpu]")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x4x4").devices
    with pytest.raises(NotImplementedError):  # jax.make_mesh alone cannot
        jax.make_mesh((1, 2, 8, 2), sharding.MESH_AXES, devices=devices)
    _assert_mesh(sharding.make_mesh(_mesh_cfg(fsdp=2, expert=8, tensor=2), devices), (1, 2, 8, 2), devices)


@pytest.mark.parametrize(
    "sizes, needle",
    [
        (dict(data=3), "has 3 devices but there are 8"),
        (dict(data=-1, fsdp=3), "do not divide"),
        (dict(data=-1, expert=-1), "at most one"),
    ],
)
def test_refuses_mesh_not_matching_devices(sizes, needle):
    with pytest.raises(sharding.MeshConfigError, match=needle):
        sharding.make_mesh(_mesh_cfg(**sizes))


@pytest.mark.parametrize(
    "sizes, needle",
    [
        (dict(data=1, expert=8), "mesh.expert=8 does not divide model.n_routed_experts=12"),
        (dict(data=1, tensor=8), "mesh.tensor=8 does not divide model.n_heads=4"),
        (dict(data=4, expert=2), "global_batch_size=4 is not divisible"),
    ],
)
def test_refuses_mesh_not_fitting_model_before_compiling(sizes, needle):
    cfg = ModelConfig(n_routed_experts=12, n_group=1, topk_group=1)
    with pytest.raises(sharding.MeshConfigError, match=needle):
        sharding.check_fits(sharding.mesh_shape(_mesh_cfg(**sizes), 8), cfg, global_batch_size=4)


@pytest.fixture(scope="module")
def sharded_state():
    """moe_tiny (small width) params and Adam moments created on fsdp=2 x expert=2 x tensor=2."""
    cfg = ModelConfig(d_model=64, n_layers=2)
    tx = make_optimizer(default_optimizer_config(), 1000)
    mesh = sharding.make_mesh(_mesh_cfg(fsdp=2, expert=2, tensor=2))
    _, abstract = abstract_state(cfg, tx, 0)
    shardings = sharding.tree_shardings(abstract, mesh)
    return sharding.create(lambda: init_state(cfg, tx, 0)[1], shardings, mesh)


def test_params_and_moments_follow_the_rules_table(sharded_state):
    adam = sharded_state["opt_state"][1][0]
    trees = {"params": sharded_state["params"], "mu": adam.mu, "nu": adam.nu}
    fe = ("fsdp", "expert")  # RULES: embed, q_lora, kv_lora -> fsdp then expert (if not yet used)
    expected = {  # path: (logical axes, spec under RULES on fsdp=2 x expert=2 x tensor=2)
        ("moe_blocks", 0, "mlp", "w_gate"): (("expert", "embed", "expert_mlp"), P("expert", "fsdp", "tensor")),
        ("moe_blocks", 0, "mlp", "w_down"): (("expert", "expert_mlp", "embed"), P("expert", "tensor", "fsdp")),
        ("moe_blocks", 0, "mlp", "router", "weight"): (("embed", "expert_replicated"), P(fe, None)),
        ("moe_blocks", 0, "attn", "wq_b"): (("q_lora", "heads", "head_dim"), P(fe, "tensor", None)),
        ("moe_blocks", 0, "attn", "wo"): (("heads", "head_dim", "embed"), P("tensor", None, fe)),
        ("dense_blocks", 0, "attn", "wkv_a"): (("embed", "kv_lora"), P(fe, None)),
        ("dense_blocks", 0, "mlp", "w_up"): (("embed", "mlp"), P(fe, "tensor")),
        ("embed",): (("vocab", "embed"), P("tensor", fe)),
    }
    for axes, spec in expected.values():  # each sharded dim uses the first free axes RULES lists
        for name, entry in zip(axes, spec):
            entry = (entry,) if isinstance(entry, str) else (entry or ())
            assert set(entry) <= set(sharding.RULES.get(name, ())), (name, entry)
    for name, tree in trees.items():
        for path, (axes, spec) in expected.items():
            leaf = tree
            for k in path:
                leaf = leaf[k]
            assert leaf.get_metadata()["axes"] == axes
            got = leaf.get_value().sharding
            assert got.spec == spec, (name, path, got.spec, spec)
            assert got.mesh.shape == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    # Everything outside the optimizer's Params is replicated.
    for x in jax.tree.leaves(sharded_state["rest"]) + [sharded_state["step"], sharded_state["rng"]]:
        assert x.sharding.is_fully_replicated


def test_routed_experts_are_split_not_replicated(sharded_state):
    w = sharded_state["params"]["moe_blocks"][0]["mlp"]["w_gate"].get_value()  # [e, d, f]
    e, d, f = w.shape
    assert {s.data.shape for s in w.addressable_shards} == {(e // 2, d // 2, f // 2)}
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(sharded_state["params"]))
    per_device = sharding.per_device_bytes(
        sharded_state["params"], jax.tree.map(lambda x: x.sharding, sharded_state["params"])
    )
    assert params_bytes / 8 < per_device < params_bytes / 2
