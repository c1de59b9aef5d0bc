"""DeepSeek-V3 / R1 (671B total, 37B activated, one MTP module). DeepSeek-V3 report Sec. 4.2:
AdamW (0.9, 0.95, wd 0.1), peak lr 2.2e-4, 2K warmup, batch ramping to 15360 sequences of 4K.
Pre-training: plain RoPE at 4K (YaRN is the later context-extension stage, Sec. 4.3), bf16
compute, float32 master weights and Adam moments (Sec. 3.3).

  python -m tools.count_params --config=configs/deepseek_v3_671b.py

Needs a pod; this file records the recipe and the shapes.
"""

from configs.base import build


def get_config():
    c = build("deepseek_v3_671b")
    # Accelerator-only recipe: bf16 compute whatever the planning machine is.
    c.model.dtype = "bfloat16"
    # 4K pre-training: no YaRN (the preset keeps the released model's, for loading its weights).
    c.model.yarn = None
    c.model.max_seq_len = 4096
    c.train.global_batch_size = 15360
    # 14.8T tokens / (15360 x 4096) ~ 235K steps (the report ramps the batch up first; we do not).
    c.train.steps = 235_000
    c.train.mtp_loss_weight = 0.3
    c.data.seq_len = 4096
    c.optimizer.lr = 2.2e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.min_lr_ratio = 0.1
    return c
