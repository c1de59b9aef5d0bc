"""Supervised "cold start" on 2-digit addition in the answer format: step (1) of the R1 recipe in miniature.

  python -m train.main --config=configs/sft_arith_tiny.py --workdir=runs/sft_arith

trains a small DeepSeek-V3-shaped model (byte tokenizer) on documents "Q: 37+45\\nA: <answer>82</answer>"
from the arithmetic task's train split (``train/rl/tasks.py``). Loading this config writes that corpus
once, deterministically, to runs/data/ under the repository root (10 JSONL files; data.val_percent
holds one out for the eval loss). Step (2) is configs/grpo_arith_tiny.py. Measured (2-core CPU,
loaded, docs/benchmarks.md "GRPO"): ~3 min, eval loss 0.341 nats/token, the answer format always
right and 25% held-out greedy accuracy: a cold start that solves some problems, which GRPO then
improves (trained on to 3,000 steps, the supervised stage alone reaches 96.5%).
"""

import os

from configs.base import build
from train.rl import tasks

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shrink(c):
    """The demo's model: moe_tiny's structure at half the width, short sequences."""
    c.model.d_model = 64
    c.model.n_layers = 3
    c.model.dense_ffn_dim = 192
    c.model.moe_ffn_dim = 32
    c.model.q_lora_rank = 32
    c.model.kv_lora_rank = 16
    c.model.max_seq_len = 128
    c.model.mtp_depth = 0
    return c


def get_config():
    c = shrink(build("moe_tiny"))
    task = tasks.Arithmetic(seed=0, heldout_percent=10, digits=2, ops="+")
    c.data.source = tasks.write_sft_corpus(task, os.path.join(_REPO, "runs", "data", "sft_arith_d2_seed0"), 20000)
    c.data.format = "jsonl"
    c.data.seq_len = 64
    c.data.val_percent = 10
    c.train.steps = 1500
    c.train.global_batch_size = 16
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.eval_batches = 2
    c.optimizer.lr = 1e-3  # 3e-3 plateaus at ~5-10% held-out accuracy
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "constant"
    return c
