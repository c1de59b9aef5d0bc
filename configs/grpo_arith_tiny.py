"""GRPO on 2-digit addition, step (2) of the R1 recipe in miniature (step (1): configs/sft_arith_tiny.py).

  python -m train.main --config=configs/sft_arith_tiny.py --workdir=runs/sft_arith
  python -m train.rl.main --config=configs/grpo_arith_tiny.py --workdir=runs/grpo_arith

starts from the supervised checkpoint in runs/sft_arith (``rl.init_checkpoint``) and samples 16
completions for each of 16 prompts per step; ~7 min on a loaded 2-core CPU. Measured
(docs/benchmarks.md "GRPO", run h7): held-out greedy accuracy 25.0% -> 44.0% after 300 steps
(49.0% at step 240), the reward rising with it. With 8 x 8 rollouts, or lr >= 5e-4, it does not
improve.
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
    c.rl.prompts_per_step = 16
    c.rl.group_size = 16
    c.rl.beta = 0.04
    c.train.steps = 300
    c.train.checkpoint_every = 50
    c.optimizer.lr = 2e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    return c
