"""llama_tiny: Llama 3.1's structure at moe_tiny's size, the dense baseline, on moe_tiny's data and schedule.

  python -m train.main --config=configs/llama_tiny.py

Grouped-query attention (4 query heads on 2 KV heads, head dim 32, plain RoPE theta 500000),
4 dense SwiGLU blocks (f = 384), untied head, no MTP, byte-level tokenizer, d_model 128 (0.86M
parameters). Measured on a 2-core CPU (jax 0.10.2) shared with other jobs (load ~15, so 23 min
wall; moe_tiny takes ~3 min idle): final_eval_bits_per_byte 1.98 against a unigram entropy of
4.74 bits per byte of the validation split (summary.json), i.e. 0.42x.
"""

from configs import moe_tiny


def get_config():
    return moe_tiny.get_config("llama_tiny")  # the same data, schedule and trainer settings
