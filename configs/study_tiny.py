"""study_tiny: the shared base of the three ablation studies (issue #13; tools/study_*.py).

  python -m train.main --config=configs/study_tiny.py --workdir=runs/study_tiny
  python -m train.main --config=configs/study_tiny.py:llama_tiny --workdir=runs/study_llama_tiny

The model preset (default moe_tiny: MLA + DeepSeekMoE + one MTP module; ``:llama_tiny`` the
Llama-3.1-style dense model) trained as configs/moe_tiny.py trains (byte tokenizer, the embedded
Python-source corpus, lr 6e-3) for fewer, smaller steps, with the eval curve sampled densely enough
to compare runs: each study (tools/study_balance.py, study_mtp.py, study_dense.py) changes only
what it ablates. A single run: ~3-4 min on a 2-core CPU (loaded; docs/benchmarks.md "Studies
(issue #13)").
"""

from configs.base import build
from configs.moe_tiny import get_config as moe_tiny


def get_config(model: str = "moe_tiny"):
    c = build(model)
    # Data, optimizer and trainer settings of configs/moe_tiny.py, whatever the model preset.
    ref = moe_tiny()
    for section in ("data", "optimizer", "train"):
        c[section] = ref[section]
    # Optimizer steps per run (moe_tiny: 400 of 32 sequences); the schedule's cosine decay ends here.
    c.train.steps = 200
    # Sequences of 128 bytes per step (moe_tiny: 32): 200 x 16 x 128 = 410k training tokens per run.
    c.train.global_batch_size = 16
    c.optimizer.warmup_steps = 20
    # Eval loss every this many steps: the curves the studies compare.
    c.train.eval_every = 25
    # Held-out batches of 16 x 128 tokens per evaluation (the same 16k tokens in every run).
    c.train.eval_batches = 8
    # One checkpoint at the end: the studies read metrics.jsonl, never resume mid-run.
    c.train.checkpoint_every = 100_000
    c.train.keep_checkpoints = 1
    # Studies run several arms in one process: no progress bar, the per-arm line is the log.
    c.train.progress = False
    return c
