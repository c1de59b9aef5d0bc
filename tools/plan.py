"""Plan a parallel run without the hardware: per-device memory of params, optimizer state and
activations for a config and mesh, from an abstract lowering of the real train step.

  python -m tools.plan --config=configs/deepseek_v3_671b_pod.py
  python -m tools.plan --config=configs/moe_tiny.py --config.mesh.data=2 --config.mesh.expert=4

The mesh is built over ``--num_devices`` fake CPU devices (default: the mesh's product, or this
machine's devices when an axis is -1), so a 2048-chip pod plans on a laptop. The refusals of a
real run apply (mesh vs devices, experts, heads, batch). The train step is traced and lowered with
``jax.ShapeDtypeStruct`` inputs carrying the real shardings (nothing is allocated), which checks
that the model, the expert-parallel all-to-all and the shardings fit together.

Reported per device:
  params, optimizer state   exact: each array's shard shape under the rules table x dtype size
  gradients                 = params (one transient copy per step)
  activations               with ``--compile`` (default for models under 2B parameters): XLA's
                            ``memory_analysis()`` temp bytes of the compiled CPU step; otherwise an
                            ESTIMATE from a formula (``activation_estimate``), labelled as such.
With ``--topology`` (e.g. ``v5p:2x2x1``, ``v5p:8x16x16``) the step is compiled by the real TPU
compiler for that slice, without a TPU (``jax.experimental.topologies``; needs libtpu, i.e.
``pip install "jax[tpu]"`` in a separate venv), and its per-device memory analysis is printed
next to the estimate; the config's "auto" choices (compute dtype, attention backend) are resolved
for TPU. If the compiler refuses the program (e.g. over HBM), its message is reported instead.
The mesh may use fewer chips than the topology has (e.g. one chip of a v5p:2x2x1 host).
Output: JSON on stdout.

  python -m tools.plan --config=configs/small.py --topology=v5p:2x2x1 --config.mesh.fsdp=4
"""

import json
import math

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).", lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to plan for (default: the mesh's size).")
_COMPILE = flags.DEFINE_bool(
    "compile", None, "Compile on CPU for XLA's memory analysis (default: only for models under 2B parameters)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Compile for this TPU topology (e.g. v5p:2x2x1) with the "
    "TPU compiler (needs libtpu) and report its per-device memory.",
)
flags.mark_flags_as_required(["config"])

GiB = 2**30


def _mesh_product(mesh_cfg):
    from train.sharding import MESH_AXES

    sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
    return None if -1 in sizes else math.prod(sizes)


def activation_estimate(cfg, sizes: dict, rows: int, seq_len: int, attention_impl: str) -> dict:
    """Peak activation bytes of one device for ``rows`` sequences per microbatch (an estimate).

    Saved for the backward: per block, its input [rows, t, d] when ``remat != "none"``, else
    ~14 d numbers per token (projections, q/k/v, MoE buffers) plus, for the naive attention, its
    f32 probabilities [h, t] per token (the other backends save the logsumexp, [h] per token).
    Plus the working set of one block (recomputed in the backward): the attention (naive: the
    f32 scores, probs and their gradient [rows, h/tensor, t, t]; blockwise/splash/cuDNN: ~4 f32
    tiles [rows, h/tensor, B, B] with B = 512 and the f32 dq accumulator [rows, h/tensor, t, d_qk]),
    the expert-parallel buffers (send, receive, return: [n * C, d]; SwiGLU hidden [n * C, f/tensor]
    x 3 in f32), and the f32 logits, softmax and gradient [rows, t, V/tensor].
    """
    from model.moe_ep import send_capacity
    from train.sharding import RULES

    def split(logical: str) -> int:  # devices a logical axis is split over (the one rules table)
        return math.prod(sizes[a] for a in RULES[logical])

    act = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    t, d = seq_len, cfg.d_model
    h = cfg.n_heads // split("heads")
    blocks = cfg.n_layers + cfg.mtp_depth
    tokens = rows * t
    naive = attention_impl == "naive"
    if cfg.remat == "none":
        saved = blocks * tokens * (14 * d * act + (4 * h * t * 4 if naive else h * 4))
    else:
        saved = blocks * tokens * d * act
    tile = min(512, t)
    attention = 3 * rows * h * t * t * 4 if naive else rows * h * (4 * tile * tile + t * cfg.qk_head_dim) * 4
    n = split("expert")
    cap = send_capacity(cfg, tokens, n)
    moe = 3 * n * cap * d * act + 3 * n * cap * (cfg.moe_ffn_dim // split("expert_mlp")) * 4
    logits = 3 * tokens * math.ceil(cfg.vocab_size / split("vocab")) * 4 * (1 + cfg.mtp_depth)
    return {
        "saved_for_backward": saved,
        "attention_working_set": attention,
        "moe_working_set": moe,
        "logits_working_set": logits,
        "peak": saved + max(attention, moe) + logits,
        "moe_rows_per_destination": cap,
    }


def _memory(mem) -> dict:
    return {
        "arguments": mem.argument_size_in_bytes / GiB,
        "outputs": mem.output_size_in_bytes / GiB,
        "aliased": mem.alias_size_in_bytes / GiB,
        "temporaries (activations etc.)": mem.temp_size_in_bytes / GiB,
    }


def _resolve_for_tpu(config) -> None:
    """The "auto" choices a TPU run makes (``train.trainer.model_config``, ``model.attention``)."""
    from model.attention import resolve_impl
    from model.config import ModelConfig

    with config.unlocked():
        if config.model.dtype == "auto":
            config.model.dtype = "bfloat16"
        qk = ModelConfig.from_dict(config.model.to_dict()).qk_head_dim
        config.kernels.attention = resolve_impl(
            config.kernels.attention,
            backend="tpu",
            seq_len=config.data.seq_len,
            dtype=config.model.dtype,
            qk_head_dim=qk,
        )


def main(argv):
    del argv
    config = _CONFIG.value
    n_dev = _NUM_DEVICES.value or _mesh_product(config.mesh)
    import jax

    if _TOPOLOGY.value:
        from jax.experimental import topologies

        try:
            topology = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value)
        except Exception as e:  # noqa: BLE001 (no libtpu, or a topology name it does not know)
            raise SystemExit(
                f"--topology={_TOPOLOGY.value}: cannot build it ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); libtpu needed: pip install 'jax[tpu]'"
            ) from None
        all_devices = topology.devices
        _resolve_for_tpu(config)
    else:
        if n_dev:  # fake exactly the devices we plan for (before any backend starts)
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", n_dev)
        all_devices = jax.devices()
    import numpy as np

    from model.attention import resolve_impl
    from model.config import ModelConfig
    from train import sharding
    from train.optimizer import make_optimizer
    from train.state import abstract_state
    from train.step import sharded_train_step

    devices = all_devices[:n_dev] if n_dev else all_devices
    mesh = sharding.make_mesh(config.mesh, devices)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    cfg = ModelConfig.from_dict(config.model.to_dict())
    tc = config.train
    sharding.check_fits(sizes, cfg, global_batch_size=tc.global_batch_size, microbatches=tc.microbatches)

    tx = make_optimizer(config.optimizer, tc.steps)
    graphdef, abstract = abstract_state(cfg, tx, tc.seed)
    state_sh = sharding.tree_shardings(abstract, mesh)
    state = sharding.with_shardings(abstract, state_sh)
    t = config.data.seq_len
    b = tc.global_batch_size
    batch_sh = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((b, t), np.dtype(dt), sharding=batch_sh)
        for k, dt in (
            ("inputs", "int32"),
            ("targets", "int32"),
            ("segment_ids", "int32"),
            ("positions", "int32"),
            ("loss_mask", "float32"),
        )
    }
    step = sharded_train_step(graphdef, tx, tc, mesh, state_sh)
    lowered = step.lower(state, batch)

    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    params_b = sharding.per_device_bytes(abstract["params"], state_sh["params"])
    opt_b = sharding.per_device_bytes(abstract["opt_state"], state_sh["opt_state"])
    rows = b // (tc.microbatches * sharding.batch_parallelism(sizes))
    attention_impl = resolve_impl(
        cfg.attention_impl,
        backend=devices[0].platform,
        seq_len=t,
        dtype=cfg.dtype,
        qk_head_dim=cfg.qk_head_dim,
        device_kind=devices[0].device_kind,
    )
    est = activation_estimate(cfg, sizes, rows, t, attention_impl)
    report = {
        "mesh": sizes,
        "devices": mesh.size,
        "device_kind": devices[0].device_kind,
        "params_total": n_params,
        "rows_per_device_per_microbatch": rows,
        "seq_len": t,
        "remat": cfg.remat,
        "dtype": cfg.dtype,
        "attention_impl": attention_impl,
        "capacity_factor": cfg.capacity_factor,
        "per_device_GiB": {
            "params": params_b / GiB,
            "optimizer_state": opt_b / GiB,
            "gradients": params_b / GiB,
            "activations_estimate": est["peak"] / GiB,
        },
        "activation_estimate_GiB": {
            k: v / GiB for k, v in est.items() if k not in ("peak", "moe_rows_per_destination")
        },
        "moe_rows_per_destination": est["moe_rows_per_destination"],
        "hlo_all_to_all": lowered.as_text().count("all_to_all"),
    }
    compiled_key = "compiled_tpu_per_device_GiB" if _TOPOLOGY.value else "compiled_cpu_per_device_GiB"
    do_compile = _TOPOLOGY.value or (_COMPILE.value if _COMPILE.value is not None else n_params < 2e9)
    if do_compile:
        try:
            mem = lowered.compile().memory_analysis()
        except Exception as e:  # e.g. the TPU compiler's "Ran out of memory in memory space hbm"
            if not _TOPOLOGY.value:
                raise
            report["compile_error"] = " ".join(str(e).split())[:2000]
        else:
            if mem is not None:
                report[compiled_key] = _memory(mem)
    report["per_device_GiB"]["total_estimate"] = (
        2 * params_b / GiB
        + opt_b / GiB
        + report.get(compiled_key, {}).get("temporaries (activations etc.)", est["peak"] / GiB)
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
