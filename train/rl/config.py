"""``config.rl``: the GRPO fields (defaults, one documented line each) and their validation."""

from __future__ import annotations

import importlib

import ml_collections
from ml_collections import config_dict

from train.rl import grpo, rewards, tasks


def default_rl_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Task (train/rl/tasks.py): "arith" | "countdown" | "jsonl".
    c.task = "arith"
    # Seed of the generated tasks (arith, countdown).
    c.task_seed = 0
    # Percent of problems held out (by a hash of the prompt), for the greedy held-out accuracy.
    c.heldout_percent = 10
    # arith: digits per operand, and the operators drawn from ("+-*").
    c.digits = 2
    c.ops = "+"
    # countdown: how many numbers, each in 1..max_number.
    c.n_numbers = 3
    c.max_number = 20
    # jsonl: path of the {"prompt": ..., "answer": ...} lines.
    c.jsonl_path = ""
    # Rewards (train/rl/rewards.py) and their weights: "name=weight,...".
    c.rewards = "correct=1.0,format=0.1"
    # Python modules imported first (comma-separated), e.g. "my_rewards": where your @rewards.register functions live.
    c.reward_modules = ""
    # Prompts per step, and G completions sampled per prompt (the group; >= 2).
    c.prompts_per_step = 8
    c.group_size = 8
    # mu: policy updates per rollout batch (DeepSeekMath Alg. 1); > 1 stores the old log-probs.
    c.updates_per_batch = 1
    # Clip range epsilon of the importance ratio; epsilon_high > epsilon is DAPO's clip-higher (unset: = epsilon).
    c.epsilon = 0.2
    c.epsilon_high = config_dict.placeholder(float)
    # KL penalty beta to the frozen reference (the starting policy); 0 keeps no reference at all.
    c.beta = 0.04
    # Advantage scaling: "std" (GRPO) or "none" (Dr. GRPO: r - mean(r)).
    c.scale_rewards = "std"
    # Loss aggregation: "sequence" (GRPO: mean of per-completion means) or "token" (DAPO: mean over tokens).
    c.aggregation = "sequence"
    # Give completions that hit max_new_tokens without EOS zero weight in the loss (DAPO overlong filtering).
    c.mask_truncated = False
    # Sampling of the rollouts (model/sampling.py); the learner's log-probs use the same temperature.
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    # Completion budget in tokens.
    c.max_new_tokens = 24
    # Held-out greedy accuracy every this many steps (and at step 0 and the end), on this many prompts.
    c.eval_every = 20
    c.eval_prompts = 200
    # Sampler RNG seed (the key is part of the checkpoint).
    c.seed = 0
    # Start the policy (and reference) from this train.main checkpoint directory (the SFT "cold start").
    c.init_checkpoint = config_dict.placeholder(str)
    return c


def check_rl_config(rl) -> dict[str, float]:
    """Refuses bad values with one line each; returns the parsed reward weights."""
    grpo.check_group_size(rl.group_size)
    checks = [
        ("prompts_per_step", rl.prompts_per_step >= 1, ">= 1"),
        ("updates_per_batch", rl.updates_per_batch >= 1, ">= 1"),
        ("epsilon", rl.epsilon > 0, "> 0"),
        ("epsilon_high", rl.epsilon_high is None or rl.epsilon_high >= rl.epsilon, ">= rl.epsilon (or unset)"),
        ("beta", rl.beta >= 0, ">= 0"),
        ("temperature", rl.temperature > 0, "> 0 (rollouts must sample; greedy is for evaluation)"),
        ("top_p", 0 < rl.top_p <= 1, "in (0, 1]"),
        ("top_k", rl.top_k >= 0, ">= 0"),
        ("max_new_tokens", rl.max_new_tokens >= 1, ">= 1"),
        ("eval_every", rl.eval_every >= 1, ">= 1"),
        ("eval_prompts", rl.eval_prompts >= 1, ">= 1"),
        ("scale_rewards", rl.scale_rewards in grpo.SCALES, f"one of {grpo.SCALES}"),
        ("aggregation", rl.aggregation in grpo.AGGREGATIONS, f"one of {grpo.AGGREGATIONS}"),
        ("task", rl.task in tasks.KINDS, f"one of {tasks.KINDS}"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"rl.{name} must be {want}, got {rl[name]!r}")
    for name in filter(None, (m.strip() for m in rl.reward_modules.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"rl.reward_modules: cannot import {name!r} ({e})") from None
    return rewards.parse_weights(rl.rewards)
