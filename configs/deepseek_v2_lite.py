"""DeepSeek-V2-Lite (15.7B total, 2.4B activated): architecture for fine-tuning converted weights.

  python -m tools.count_params --config=configs/deepseek_v2_lite.py

Training it needs accelerators (its float32 master weights alone are ~63 GB; bf16 compute); the
data default is the byte corpus, so set data.tokenizer to the model's tokenizer.json when
fine-tuning. It keeps the released model's YaRN (a checkpoint converted from it has it).
"""

from configs.base import build


def get_config():
    c = build("deepseek_v2_lite")
    # Accelerator-only recipe: bf16 compute whatever the planning machine is.
    c.model.dtype = "bfloat16"
    c.train.global_batch_size = 256
    c.train.steps = 20_000
    c.data.seq_len = 4096
    c.optimizer.lr = 4.2e-4
    c.optimizer.warmup_steps = 2000
    return c
