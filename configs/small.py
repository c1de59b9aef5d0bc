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
    # Memory (issue #15): one scanned MoE block body, whose backward computes each layer's weight
    # gradients in that layer's step (unscanned, XLA:CPU defers them to the end of the backward and
    # keeps every layer's activations live), and each block recomputed in the backward: 4 x 1,024
    # tokens train in ~1.4 GiB of XLA temporaries instead of ~3.8 GiB (docs/benchmarks.md).
    c.model.scan_layers = True
    c.model.remat = "full"
    # Both Adam moments stored in bf16, as DeepSeek-V3 trains (report Sec. 3.3.3); 0.42 GB less
    # state at this size, the update runs in f32 (train/optimizer.py).
    c.optimizer.moment_dtype = "bfloat16"
    return c
