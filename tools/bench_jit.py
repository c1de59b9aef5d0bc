"""Per-step cost of ``nnx.jit`` (object graph walked on every call) against split once + ``jax.jit``.

  python -m tools.bench_jit [--steps=20] [--config.x=...]

Both run the same update on moe_tiny's model with synthetic batches: loss -> grads -> AdamW. The
``nnx`` variant is the Flax 0.12 idiom (``nnx.Optimizer(model, tx, wrt=nnx.Param)``,
``optimizer.update(model, grads)`` inside ``nnx.jit``); the ``pure`` variant is what
``train/step.py`` does (``nnx.split`` once, a pure function of arrays under ``jax.jit``, state
donated). Prints one JSON line per variant with the median step time.
"""

import json
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_tiny.py", "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant (after one compile step).")


def _median_ms(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 2)


def main(argv):
    del argv
    from model.config import ModelConfig
    from model.loss import lm_losses
    from model.transformer import Transformer
    from train.optimizer import make_optimizer
    from train.state import init_state
    from train.step import make_train_step
    from train.synthetic import synthetic_batches

    config = _CONFIG.value
    cfg = ModelConfig.from_dict(config.model.to_dict())
    tx = make_optimizer(config.optimizer, 1000)
    batch = synthetic_batches(config.train.global_batch_size, config.data.seq_len, 1)[0]
    mtp_w = config.train.mtp_loss_weight

    # nnx.jit: the graph is traversed on every call.
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, batch):
        def loss_fn(model):
            out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
            losses = lm_losses(out, batch, mtp_w)
            return losses["main_loss"] + losses["mtp_loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def run_nnx():
        jax.block_until_ready(nnx_step(model, optimizer, batch))

    run_nnx()
    # split once + jax.jit of a pure function (train/step.py; it also does the bias update).
    graphdef, state = init_state(cfg, tx, 0)
    step = jax.jit(make_train_step(graphdef, tx, config.train), donate_argnums=(0,))
    holder = {"state": state}

    def run_pure():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    run_pure()
    for name, fn in (("nnx.jit", run_nnx), ("split+jax.jit", run_pure)):
        print(
            json.dumps(
                {
                    "variant": name,
                    "step_ms": _median_ms(fn, _STEPS.value),
                    "batch": config.train.global_batch_size,
                    "seq_len": config.data.seq_len,
                    "backend": jax.default_backend(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
