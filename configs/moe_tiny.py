"""moe_tiny: DeepSeek-V3's structure at toy size, trained on the Python standard library's source.

  python -m train.main --config=configs/moe_tiny.py

MLA with query and KV latents, 1 dense + 3 MoE blocks (16 routed experts, top-4 in 4 groups of
which 2 are kept, 1 shared expert), sigmoid router with the aux-loss-free bias, one MTP module,
byte-level tokenizer, d_model 128 (2.1M parameters). Measured on a 2-core CPU (jax 0.10.2):
final_eval_bits_per_byte 2.08 against a unigram entropy of 4.74 bits per byte of the validation
split (summary.json), i.e. 0.44x; ~4 min wall on an idle machine before the global data shuffle
(docs/benchmarks.md has the last, loaded-machine measurement).
"""

from configs.base import build


def get_config(preset: str = "moe_tiny"):
    """``preset``: the model (``model/presets.py``); ``configs/llama_tiny.py`` and
    ``configs/qwen_moe_tiny.py`` are this with "llama_tiny" and "qwen_moe_tiny"."""
    c = build(preset)
    c.train.steps = 400
    c.train.global_batch_size = 32
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.data.seq_len = 128
    c.optimizer.lr = 6e-3
    c.optimizer.warmup_steps = 30
    return c
