"""GRPO on 2-digit addition, step (2) of the R1 recipe in miniature (step (1): configs/sft_arith_tiny.py).

  python -m train.main --config=configs/sft_arith_tiny.py --workdir=runs/sft_arith
  python -m train.rl.main --config=configs/grpo_arith_tiny.py --workdir=runs/grpo_arith

starts from the supervised checkpoint in runs/sft_arith (``rl.init_checkpoint``) and samples 8
completions for each of 8 prompts per step; ~2.5 min on a loaded 2-core CPU. Measured
(docs/benchmarks.md "GRPO"): from the cold start's 6.5% held-out greedy accuracy it does not improve
(3.5% after 100 steps): the cold start is too weak for G = 8 samples to find right answers often.
"""

from configs.base import build
from configs.sft_arith_tiny import shrink
from train.rl.config import default_rl_config


def get_config():
    c = shrink(build("moe_tiny"))
    c.data.seq_len = 64  # unused by GRPO (rollout rows are prompt + max_new_tokens), kept <= model.max_seq_len
    # GRPO settings (train/rl/config.py documents every field).
    c.rl = default_rl_config()
    c.rl.init_checkpoint = "runs/sft_arith/checkpoints"
    c.rl.beta = 0.0
    c.train.steps = 100
    c.train.checkpoint_every = 50
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    return c
