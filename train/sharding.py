"""Device mesh and shardings: the one table that maps logical axis names to mesh axes.

The model names only *logical* axes (``model/params.py``: every ``nnx.Param`` carries ``axes``
metadata such as ``("expert", "embed", "expert_mlp")``). ``RULES`` below maps each logical name
to mesh axes; a name it does not list is replicated. Everything else here applies that table:

  mesh axes   data    plain data parallelism (params replicated; gradients all-reduced)
              fsdp    data parallelism that also shards params and Adam moments (ZeRO-3 / FSDP:
                      XLA all-gathers each layer's weights when it is used, reduce-scatters grads)
              expert  expert parallelism: routed experts split over it, tokens travel by all-to-all
                      (``model/moe_ep.py``); it also splits the batch and, like fsdp, the other
                      weights
              tensor  tensor parallelism: attention heads, FFN hidden widths, the vocabulary

Params and their Adam moments get the same sharding by construction: optax's moments are
``nnx.Param`` copies of the params and keep their ``axes`` metadata. The batch is split over
``BATCH_AXES`` and replicated over ``tensor``.

Axis types: the mesh is built with ``AxisType.Auto`` on purpose. With ``Explicit`` axes (the
default of ``jax.make_mesh`` from jax 0.11 on) shardings become part of every array's type, so
each einsum that contracts a sharded dimension (FSDP's ``embed``, TP's ``heads``) would need an
``out_sharding`` argument in the model code, i.e. the model would have to name mesh axes. With
``Auto`` axes the model stays mesh-agnostic: jit's in/out shardings pin params, moments and batch,
XLA's partitioner propagates them through the layers, and the one place where the layout must be
exact (the expert all-to-all) is an explicit ``jax.shard_map``, whose mesh and axes the model
receives from ``expert_parallel`` (built from ``RULES``, passed as an argument: the model never
reads a mesh from context).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.moe_ep import ExpertParallel

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # outer (slow links, across hosts) -> inner
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes, in order of preference; a mesh axis already taken by an earlier dim of
# the same array is skipped (so routed experts, whose "expert" dim takes mesh "expert", shard their
# "embed" dim over fsdp alone). The weight dims are sharded over expert as well as fsdp: the batch
# is split over expert anyway, so non-expert weights are ZeRO-sharded over it instead of replicated.
# Not listed (replicated): head_dim, expert_replicated (router centroids), embed_concat (MTP
# projection input), norm, and the scanned layer axis.
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),  # wq_b [q, h, n+r]: its only dim besides heads
    "kv_lora": ("fsdp", "expert"),  # wkv_b [c, h, n+v]
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),  # GQA's k/v projections [d, j, k]: replicated when tensor does not divide j
    "mlp": ("tensor",),
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
}


class MeshConfigError(ValueError):
    """The mesh does not fit the devices, the model or the batch (raised before compiling)."""


# ---------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """``{axis: size}`` from ``config.mesh`` with at most one -1 (= the remaining devices).

    A mesh of size 1 (the default) is the single-device run on the first device, whatever the
    device count; any other mesh must use every device of every process.
    """
    sizes = {a: int(getattr(mesh_cfg, a)) for a in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise MeshConfigError(f"mesh axis sizes must be positive or -1, got {bad}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshConfigError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise MeshConfigError(
                f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the "
                f"{n_devices} devices, so mesh.{free[0]}=-1 has no valid size"
            )
        sizes[free[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total != 1 and total != n_devices:
        raise MeshConfigError(
            f"mesh {sizes} has {total} devices but there are {n_devices} "
            f"({jax.process_count()} process(es)); the product of mesh.data, "
            f"mesh.fsdp, mesh.expert and mesh.tensor must equal the device count "
            f"(or be 1 for a single-device run); one axis may be -1"
        )
    if total == 1 and jax.process_count() > 1:
        raise MeshConfigError(
            f"a 1-device mesh cannot span {jax.process_count()} processes; set e.g. --config.mesh.data=-1"
        )
    return sizes


def make_mesh(mesh_cfg, devices: Optional[list] = None) -> Mesh:
    """The training mesh over all devices of all processes (see ``mesh_shape``)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes deliberately: see the module docstring.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(shape) == 1:
        return Mesh(np.asarray(devices[:1]).reshape(shape), MESH_AXES, axis_types=auto)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # "Failed to find assignment for logical_axis_index ...": jax.make_mesh lays each mesh axis
        # on whole physical torus axes, which fails for e.g. 1x16x64x2 on a v5p 8x16x16 pod. Then
        # split physical axes: the mesh builds, at the price of some axes spanning a ring less
        # well (mesh_utils' documented fallback).
        grid = mesh_utils.create_device_mesh(shape, devices[: math.prod(shape)], allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def batch_parallelism(sizes: dict[str, int]) -> int:
    return math.prod(sizes[a] for a in BATCH_AXES)


def check_fits(sizes: dict[str, int], cfg, *, global_batch_size: int, microbatches: int = 1) -> None:
    """Refuses, before anything compiles, a mesh that cannot run this model and batch."""
    errors = []
    e, t = sizes["expert"], sizes["tensor"]
    if cfg.n_routed_experts % e:
        errors.append(f"mesh.expert={e} does not divide model.n_routed_experts={cfg.n_routed_experts}")
    widths = {"n_heads": cfg.n_heads, "dense_ffn_dim": cfg.dense_ffn_dim, "moe_ffn_dim": cfg.moe_ffn_dim}
    if cfg.n_shared_experts:
        widths["n_shared_experts * moe_ffn_dim"] = cfg.n_shared_experts * cfg.moe_ffn_dim
    for name, width in widths.items():
        if width % t:
            errors.append(f"mesh.tensor={t} does not divide model.{name}={width}")
    rows = batch_parallelism(sizes) * microbatches
    if global_batch_size % rows:
        errors.append(
            f"train.global_batch_size={global_batch_size} is not divisible by mesh.data x "
            f"mesh.fsdp x mesh.expert ({batch_parallelism(sizes)}, the batch is split over "
            f"all three) x train.microbatches ({microbatches})"
        )
    if errors:
        raise MeshConfigError(f"mesh {sizes} does not fit the config:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------------
# Shardings


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(axes, shape, mesh) -> P:
    """PartitionSpec of an array with logical ``axes`` and ``shape`` under ``RULES``.

    A leading dimension without a name (the layer axis added by ``nnx.scan``) is replicated. A mesh
    axis is used once per array, and a dimension takes its rule's axes in order while their product
    divides it (q_lora=1536 on fsdp=16 x expert=64 takes fsdp only).
    """
    sizes = _axis_sizes(mesh)
    axes = (None,) * (len(shape) - len(axes)) + tuple(axes)
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        taken, ways = [], 1
        for a in RULES.get(name, ()):
            if a not in used and sizes.get(a, 1) > 1 and dim % (ways * sizes[a]) == 0:
                taken.append(a)
                ways *= sizes[a]
        used.update(taken)
        spec.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding for every array leaf: from ``axes`` metadata for ``nnx.Param`` (params and
    Adam moments alike), replicated for everything else (step, rng, router bias and load, ...)."""

    def leaf(x):
        if _is_var(x):
            axes = x.get_metadata().get("axes") if isinstance(x, nnx.Param) else None
            shape = x.get_value().shape
            spec = logical_to_spec(axes, shape, mesh) if axes is not None else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, tree, is_leaf=_is_var)


def create(make: Callable[[], Any], shardings: Any, mesh: Mesh) -> Any:
    """``make()``'s arrays, created already sharded: each device computes only its shards, so a
    model too big for one device can be initialised. One compiled program on every mesh, one
    device included: run eagerly, ``make`` would compile and cache one executable per operation
    and parameter shape (``small``: ~0.2 GB of host memory held for the whole run, issue #15), and
    its initial values would differ from a mesh's by ~1 ulp (XLA's fusion rounds a few of them
    differently under jit)."""
    return jax.jit(make, out_shardings=shardings)()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying ``shardings`` (restore targets, AOT lowering inputs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[b, ...] batches: rows over (data, fsdp, expert), replicated over tensor."""
    return NamedSharding(mesh, P(RULES["batch"]))


def expert_parallel(mesh: Mesh) -> Optional[ExpertParallel]:
    """The MoE layers' ``shard_map`` layout on ``mesh`` under ``RULES`` (None for one device)."""
    if mesh.size == 1:
        return None
    return ExpertParallel(
        mesh, batch=RULES["batch"], expert=RULES["expert"], mlp=RULES["expert_mlp"], heads=RULES["heads"]
    )


def global_batch(local: dict, mesh: Mesh) -> dict:
    """One global ``jax.Array`` per field from this process's rows (``train/data.py`` gives each
    process rows ``process_index::process_count``; the global batch is their concatenation in
    process order, a row permutation of the 1-process batch, which changes no loss)."""
    sharding = batch_sharding(mesh)
    pc = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * pc,) + v.shape[1:])
        for k, v in local.items()
    }


class MeshJit:
    """``jax.jit`` whose tracing and calls happen with ``mesh`` in context (``jax.set_mesh``; the
    model itself takes its mesh as an argument). ``lower`` gives the AOT lowering."""

    def __init__(self, fn, mesh: Mesh, **jit_kwargs):
        self.mesh = mesh
        self._jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
