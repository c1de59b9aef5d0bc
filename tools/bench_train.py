"""Train-step throughput of a config, measured through the real trainer.

  python -m tools.bench_train --config=configs/moe_tiny.py [--steps=20] [--config.x=...]

Runs ``steps`` optimizer steps in a temporary workdir (the first step, which compiles, is not
timed) and prints one JSON line: step time, tokens/s, model FLOPs per token and MFU with the
peak it divides by and that peak's source (``train/peak.py``: config, datasheet or measured).
"""

import json
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Steps to run (the first compiles and is not timed).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from model.config import ModelConfig
    from train.flops import model_flops_per_token
    from train.trainer import train_and_evaluate

    config = _CONFIG.value
    with config.unlocked():
        config.train.steps = _STEPS.value
        config.train.eval_every = 10**9
        config.train.eval_batches = 1
        config.train.checkpoint_every = 10**9
        config.train.async_checkpoint = False
        config.train.tracker = "none"
        config.train.progress = False
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, _STEPS.value)
    with tempfile.TemporaryDirectory() as workdir:
        s = train_and_evaluate(config, workdir)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    print(
        json.dumps(
            {
                "config": flags.FLAGS["config"].config_filename,
                "steps": s["steps"],
                "step_ms": round(1e3 * tokens_per_step / s["tokens_per_second"], 2),
                "tokens_per_second": round(s["tokens_per_second"], 1),
                "model_flops_per_token": model_flops_per_token(cfg, config.data.seq_len),
                "mfu": s["mfu"],
                "peak_flops_per_device": s["peak_flops_per_device"],
                "peak_source": s["peak_source"],
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
