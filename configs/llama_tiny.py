"""llama_tiny: Llama 3.1's structure at moe_tiny's size, the dense baseline, on moe_tiny's data and schedule.

  python -m train.main --config=configs/llama_tiny.py

Grouped-query attention (4 query heads on 2 KV heads, head dim 32, Llama-3.1 RoPE scaling),
4 dense SwiGLU blocks (f = 384), untied head, no MTP, byte-level tokenizer, d_model 128 (0.86M
parameters). Measured on a 2-core CPU (jax 0.10.2): see docs/benchmarks.md / the README's
architecture section for the final eval bits per byte.
"""

from configs.base import build


def get_config():
    c = build("llama_tiny")
    c.train.steps = 400
    c.train.global_batch_size = 32
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.data.seq_len = 128
    c.optimizer.lr = 6e-3
    c.optimizer.warmup_steps = 30
    return c
