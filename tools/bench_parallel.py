"""moe_tiny train-step times on several meshes of 8 fake CPU devices (informational).

  python -m tools.bench_parallel [--steps=5] [--seq_len=64] [--batch=16] [--d_model=128]

Prints one JSON line per mesh: compile seconds, median step seconds, tokens/s and the dropped
count. On a CPU host the 8 "devices" share its cores, so this measures the parallel code's
overhead (collectives, all-to-all buffers), not a speed-up.
"""

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh (after one compile step).")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch (rows).")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width (moe_tiny: 128).")

MESHES = [
    dict(),
    dict(data=8),
    dict(fsdp=8),
    dict(data=2, expert=4),
    dict(data=2, expert=2, tensor=2),
    dict(fsdp=2, expert=2, tensor=2),
]


def bench(mesh_sizes: dict) -> dict:
    import jax

    from configs import moe_tiny
    from model.config import ModelConfig
    from train import sharding
    from train.optimizer import make_optimizer
    from train.state import abstract_state, init_state
    from train.step import sharded_train_step
    from train.synthetic import synthetic_batches

    c = moe_tiny.get_config()
    c.mesh.update(mesh_sizes)
    c.data.seq_len, c.train.global_batch_size = _SEQ.value, _BATCH.value
    c.model.d_model, c.model.n_layers, c.model.mtp_depth = _D_MODEL.value, 4, 1  # moe_tiny's depth
    mesh = sharding.make_mesh(c.mesh)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    sharding.check_fits(dict(zip(mesh.axis_names, mesh.axis_sizes)), cfg, global_batch_size=c.train.global_batch_size)
    tx = make_optimizer(c.optimizer, c.train.steps)
    graphdef, abstract = abstract_state(cfg, tx, 0)
    state_sh = sharding.tree_shardings(abstract, mesh)
    state = sharding.create(lambda: init_state(cfg, tx, 0)[1], state_sh, mesh)
    step = sharded_train_step(graphdef, tx, c.train, mesh, state_sh)
    batches = [
        sharding.global_batch(b, mesh)
        for b in synthetic_batches(c.train.global_batch_size, c.data.seq_len, _STEPS.value + 1)
    ]
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times, dropped = [], 0.0
    for b in batches[1:]:
        t0 = time.perf_counter()
        state, m = step(state, b)
        m = jax.device_get(m)
        times.append(time.perf_counter() - t0)
        dropped += float(m["dropped_tokens"])
    step_s = statistics.median(times)
    return {
        "mesh": {a: getattr(c.mesh, a) for a in sharding.MESH_AXES},
        "devices": mesh.size,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(_BATCH.value * _SEQ.value / step_s, 1),
        "dropped": dropped,
    }


def main(argv):
    del argv
    for mesh in MESHES:
        print(json.dumps(bench(mesh)), flush=True)


if __name__ == "__main__":
    app.run(main)
