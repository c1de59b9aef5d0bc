"""Shared builder for the experiment configs in this folder.

Each ``configs/<name>.py`` calls ``build(preset)`` and then changes what differs. Every field is
overridable on the command line (``--config.train.steps=100``); the config is locked, so a
misspelled field is an error, not a silent no-op.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from model import presets
from train.data import default_data_config
from train.optimizer import default_optimizer_config

# Optional model fields: placeholders keep their type so they can be set from the command line.
_OPTIONAL = {"q_lora_rank": int, "capacity_factor": float, "n_kv_heads": int, "head_dim": int}


def model_config_dict(preset: str) -> ml_collections.ConfigDict:
    """The preset's ``ModelConfig`` as a ConfigDict (field docs: ``model/config.py``)."""
    cfg = presets.get(preset)
    d = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("yarn", "llama3_rope"):
            v = None if v is None else ml_collections.ConfigDict(dataclasses.asdict(v))
        elif f.name in _OPTIONAL:
            v = (
                config_dict.placeholder(_OPTIONAL[f.name])
                if v is None
                else config_dict.FieldReference(v, field_type=_OPTIONAL[f.name])
            )
        d[f.name] = v
    # Compute dtype of the matmuls: "auto" = bfloat16 on GPU/TPU, float32 on CPU (ModelConfig resolves it).
    d["dtype"] = "auto"
    return ml_collections.ConfigDict(d)


def build(preset: str) -> ml_collections.ConfigDict:
    """``config.model`` holds exactly ModelConfig's fields: ``ModelConfig.from_dict(config.model.to_dict())``
    is the model of this experiment, wherever it is built (trainer, tools, tests)."""
    c = ml_collections.ConfigDict()
    # Model hyperparameters: the fields of model.config.ModelConfig, starting from a named preset.
    c.model = model_config_dict(preset)
    # Data pipeline (train/data.py): corpus, tokenizer, sequence length, split, shuffling.
    c.data = default_data_config()
    # AdamW + schedule (train/optimizer.py).
    c.optimizer = default_optimizer_config()

    # Kernel backend of the grouped matmul and router (kernels_pallas/backend.py): "auto" = Pallas
    # on TPU, ragged_dot on GPU, scan on CPU; "pallas" forces the Pallas kernels (interpreted on
    # CPU: slow, for tests); "ragged_dot" = lax.ragged_dot; "scan" = the portable tiled scan.
    c.kernels = ml_collections.ConfigDict({"impl": "auto"})
    # The one kernel switch is kernels.impl; model.kernels_impl refers to it (one value under
    # ModelConfig's field name: setting either sets both).
    c.model.kernels_impl = c.kernels.get_ref("impl")
    # Attention backend (model/attention.py): "auto" = splash on TPU, cuDNN flash on GPU, on CPU the
    # naive [t, t] softmax up to 256 tokens and blockwise XLA above; or "naive" | "xla" | "splash" | "cudnn".
    # model.attention_impl refers to it, as model.kernels_impl does to kernels.impl.
    c.kernels.attention = "auto"
    c.model.attention_impl = c.kernels.get_ref("attention")

    # Device mesh (train/sharding.py). The product of the four sizes must be the device count of
    # all processes together, or 1: the default 1 x 1 x 1 x 1 is the single-device run on the first
    # device even where more are visible (8 fake CPU devices in the tests run exactly as 1).
    # One axis may be -1 = all remaining devices, e.g. --config.mesh.data=-1 for data parallelism.
    m = c.mesh = ml_collections.ConfigDict()
    # Plain data parallelism: splits the batch; params and moments replicated.
    m.data = 1
    # Fully sharded data parallelism: splits the batch and shards params and Adam moments.
    m.fsdp = 1
    # Expert parallelism: must divide model.n_routed_experts; tokens move by all-to-all; also splits the batch.
    m.expert = 1
    # Tensor parallelism: splits attention heads, FFN widths, vocabulary; must divide n_heads and FFN widths.
    m.tensor = 1

    t = c.train = ml_collections.ConfigDict()
    # Optimizer steps to run.
    t.steps = 1000
    # Sequences per optimizer step, over all devices and processes.
    t.global_batch_size = 16
    # Gradient accumulation: the global batch is split into this many sequential microbatches.
    t.microbatches = 1
    # Seed of parameter initialisation (the data order has its own seed in data.seed).
    t.seed = 0
    # MTP loss weight lambda (DeepSeek-V3 report Sec. 4.2 uses 0.3, then 0.1).
    t.mtp_loss_weight = 0.3
    # Sequence-wise balance loss weight alpha (report Sec. 4.2: 0.0001); 0 disables it.
    t.balance_loss_alpha = 1e-4
    # Classic batch-wise auxiliary balance loss weight (GShard / Switch / DeepSeek-V2; usual 0.01),
    # added to the balance_loss metric; 0 disables it (DeepSeek-V3 uses the aux-free bias instead).
    t.aux_loss_alpha = 0.0
    # Aux-loss-free bias update speed gamma (report Sec. 4.2: 0.001); 0 disables the update.
    t.bias_update_rate = 1e-3
    # Write metrics every this many steps (1 = every step).
    t.log_every = 1
    # Evaluate on the held-out split every this many steps (and always at the end).
    t.eval_every = 250
    # Held-out batches (of global_batch_size sequences) per evaluation.
    t.eval_batches = 8
    # Save a checkpoint every this many steps (and always at the end and on SIGTERM).
    t.checkpoint_every = 250
    # Checkpoints kept (older ones are deleted), >= 1.
    t.keep_checkpoints = 3
    # Write checkpoints in a background thread.
    t.async_checkpoint = True
    # If the latest checkpoint is corrupt, restore the previous one instead of stopping.
    t.restore_fallback = False
    # Start from step 0 even though every checkpoint in the workdir was quarantined as corrupt.
    t.start_from_scratch = False
    # Initialise the parameters from this checkpoint (e.g. from tools.convert_hf) when the workdir is new.
    t.init_checkpoint = config_dict.placeholder(str)
    # Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).
    t.max_nonfinite_steps = 5
    # Peak FLOP/s of one device for MFU; unset = the datasheet peak of the device kind and compute
    # dtype (train/peak.py), or on CPU a matmul measured at start (the run logs which).
    t.peak_flops = config_dict.placeholder(float)
    # Experiment tracker fed the scalars of metrics.jsonl (train/tracker.py): "none" | "tensorboard"
    # (event files in <workdir>/tb) | "wandb" (honours WANDB_MODE=offline), or several joined by commas.
    t.tracker = "none"
    # wandb project of the run (the WANDB_PROJECT environment variable overrides it).
    t.wandb_project = "latentmoe"
    # Write the per-layer, per-expert loads (expert_load) into metrics.jsonl every this many steps
    # (and at the last); maxvio per layer stays on every line. DeepSeek-V3: ~250 KB a line.
    t.log_expert_load_every = 10
    # Steps "A:B" to trace with jax.profiler into <workdir>/profile (steps A+1..B; e.g. "10:15"), or unset.
    t.profile_steps = config_dict.placeholder(str)
    # Show a progress bar on the console.
    t.progress = True
    return c
