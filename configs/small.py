"""small: ~100M total / ~30M activated parameters (model.presets.small), byte-level vocabulary.

  python -m train.main --config=configs/small.py

Meant for one accelerator (bf16 compute); on a CPU it runs but slowly (minutes per 10 steps).
"""

from configs.base import build


def get_config():
    c = build("small")
    c.train.steps = 20000
    c.train.global_batch_size = 64
    c.data.seq_len = 1024
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 500
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
