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
AOT-compiling for a real TPU topology (``jax.experimental.topologies``) needs libtpu; where it is
installed, that compiler's memory analysis would replace the estimate. Output: JSON on stdout.
"""

import json
import math

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).", lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to plan for (default: the mesh's size).")
_COMPILE = flags.DEFINE_bool("compile", None, "Compile on CPU for XLA's memory analysis (default: "
                             "only for models under 2B parameters).")
flags.mark_flags_as_required(["config"])

GiB = 2 ** 30


def _mesh_product(mesh_cfg):
    sizes = [int(getattr(mesh_cfg, a)) for a in ("data", "fsdp", "expert", "tensor")]
    return None if -1 in sizes else math.prod(sizes)


def activation_estimate(cfg, sizes: dict, rows: int, seq_len: int) -> dict:
    """Peak activation bytes of one device for ``rows`` sequences per microbatch (an estimate).

    Saved for the backward: per block, its input [rows, t, d] when ``remat != "none"``, else
    ~(14 d + 4 h t) numbers per token (projections, q/k/v, MoE buffers, f32 attention probs).
    Plus the working set of one block (recomputed in the backward): the f32 attention scores,
    probs and their gradient [rows, h/tensor, t, t], and the expert-parallel buffers (send,
    receive, return: [n * C, d]; SwiGLU hidden [n * C, f/tensor] x 3 in f32), and the f32 logits,
    softmax and gradient [rows, t, V/tensor].
    """
    from model.moe_ep import send_capacity
    act = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    t, d = seq_len, cfg.d_model
    h = cfg.n_heads // sizes["tensor"]
    blocks = cfg.n_layers + cfg.mtp_depth
    tokens = rows * t
    if cfg.remat == "none":
        saved = blocks * tokens * (14 * d * act + 4 * h * t * 4)
    else:
        saved = blocks * tokens * d * act
    attention = 3 * rows * h * t * t * 4
    n = sizes["expert"]
    cap = send_capacity(cfg, tokens, n)
    moe = 3 * n * cap * d * act + 3 * n * cap * (cfg.moe_ffn_dim // sizes["tensor"]) * 4
    logits = 3 * tokens * math.ceil(cfg.vocab_size / sizes["tensor"]) * 4 * (1 + cfg.mtp_depth)
    return {"saved_for_backward": saved, "attention_working_set": attention,
            "moe_working_set": moe, "logits_working_set": logits,
            "peak": saved + max(attention, moe) + logits, "moe_rows_per_destination": cap}


def main(argv):
    del argv
    config = _CONFIG.value
    n_dev = _NUM_DEVICES.value or _mesh_product(config.mesh)
    import jax
    if n_dev:  # fake exactly the devices we plan for (before any backend starts)
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n_dev)
    import numpy as np

    from model.config import ModelConfig
    from train import sharding
    from train.optimizer import make_optimizer
    from train.state import abstract_state
    from train.step import sharded_train_step

    devices = jax.devices()[:n_dev] if n_dev else jax.devices()
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
    batch = {k: jax.ShapeDtypeStruct((b, t), np.dtype(dt), sharding=batch_sh) for k, dt in
             (("inputs", "int32"), ("targets", "int32"), ("segment_ids", "int32"), ("positions", "int32"),
              ("loss_mask", "float32"))}
    step = sharded_train_step(graphdef, tx, tc, mesh, state_sh)
    lowered = step.lower(state, batch)

    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    params_b = sharding.per_device_bytes(abstract["params"], state_sh["params"])
    opt_b = sharding.per_device_bytes(abstract["opt_state"], state_sh["opt_state"])
    rows = b // (tc.microbatches * sharding.batch_parallelism(sizes))
    est = activation_estimate(cfg, sizes, rows, t)
    report = {
        "mesh": sizes, "devices": mesh.size, "params_total": n_params,
        "rows_per_device_per_microbatch": rows, "seq_len": t, "remat": cfg.remat,
        "capacity_factor": cfg.capacity_factor,
        "per_device_GiB": {"params": params_b / GiB, "optimizer_state": opt_b / GiB, "gradients": params_b / GiB,
                           "activations_estimate": est["peak"] / GiB},
        "activation_estimate_GiB": {k: v / GiB for k, v in est.items() if k not in ("peak", "moe_rows_per_destination")},
        "moe_rows_per_destination": est["moe_rows_per_destination"],
        "hlo_all_to_all": lowered.as_text().count("all_to_all"),
    }
    do_compile = _COMPILE.value if _COMPILE.value is not None else n_params < 2e9
    if do_compile:
        mem = lowered.compile().memory_analysis()
        if mem is not None:
            report["compiled_cpu_per_device_GiB"] = {
                "arguments": mem.argument_size_in_bytes / GiB, "outputs": mem.output_size_in_bytes / GiB,
                "aliased": mem.alias_size_in_bytes / GiB, "temporaries (activations etc.)": mem.temp_size_in_bytes / GiB}
    report["per_device_GiB"]["total_estimate"] = (
        2 * params_b / GiB + opt_b / GiB
        + report.get("compiled_cpu_per_device_GiB", {}).get("temporaries (activations etc.)", est["peak"] / GiB))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
