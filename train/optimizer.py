"""AdamW with global-norm clipping and a warmup + {cosine, constant, WSD} learning-rate schedule.

The chain is ``clip_by_global_norm(clip_norm) -> adamw(schedule, mask=ndim >= 2)``, the recipe of
the DeepSeek-V3 report (Sec. 4.2: AdamW, b1 0.9, b2 0.95, weight decay 0.1, clip 1.0).

Weight decay touches only matrices (``ndim >= 2``: projections, experts, embedding, head); norm
scales and biases are exempt. The router's aux-loss-free selection bias (V3 report Sec. 2.1.2) is
not an ``nnx.Param`` at all, so it never reaches this optimizer: it is updated by its own sign rule
in the train step.

Gradient accumulation is the trainer's microbatch scan, not ``optax.MultiSteps``.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

SCHEDULES = ("cosine", "constant", "wsd")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Defaults for ``config.optimizer``; sized for ``moe_tiny``."""
    c = ml_collections.ConfigDict()
    # Peak learning rate, reached at the end of warmup.
    c.lr = 3e-3
    # Shape after warmup: "cosine" (to min_lr), "constant" (peak), or "wsd" (warmup-stable-decay).
    c.schedule = "cosine"
    # Linear warmup from 0 to lr over this many optimizer steps.
    c.warmup_steps = 100
    # "wsd" only: fraction of total_steps at the end spent decaying linearly to min_lr.
    c.decay_fraction = 0.2
    # Final learning rate as a fraction of lr ("cosine" and "wsd").
    c.min_lr_ratio = 0.1
    # Adam first-moment decay.
    c.b1 = 0.9
    # Adam second-moment decay.
    c.b2 = 0.95
    # Adam denominator epsilon.
    c.eps = 1e-8
    # Decoupled weight decay (multiplied by the scheduled lr), on ndim >= 2 parameters only.
    c.weight_decay = 0.1
    # Clip the global gradient norm to this value before Adam; 0 or None disables clipping.
    c.clip_norm = 1.0
    # Storage dtype of both Adam moments between steps; unset = float32. "bfloat16" is DeepSeek-V3's
    # choice (report Sec. 3.3.3: "BF16 ... to track the first and second moments in the AdamW
    # optimizer, without incurring observable performance degradation"); the update itself runs in
    # float32, and the parameters (master weights) and gradients stay float32.
    c.moment_dtype = config_dict.placeholder(str)
    return c


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """lr(step) for step = number of updates already applied (optax's ``count``).

    warmup:   lr * (step + 1) / warmup_steps            for step < warmup_steps
    cosine:   min + (lr - min) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total - warmup)
    constant: lr
    wsd:      lr until total - decay_steps, then linear to min over decay_steps
              (decay_steps = round(decay_fraction * total); Hägele et al. 2024, "Scaling Laws and
              Compute-Optimal Training Beyond Fixed Training Durations")
    with min = lr * min_lr_ratio. Steps past total_steps stay at the final value. A warmup longer
    than the run (e.g. a short test run of a long recipe) is clipped to total_steps, with a warning.
    """
    peak = float(opt_cfg.lr)
    kind = opt_cfg.schedule
    warmup = int(opt_cfg.warmup_steps)
    floor = peak * float(opt_cfg.min_lr_ratio)
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}")
    if total_steps <= 0 or warmup < 0:
        raise ValueError(f"need warmup_steps={warmup} >= 0 and total_steps={total_steps} > 0")
    if warmup > total_steps:
        warnings.warn(
            f"optimizer.warmup_steps={warmup} exceeds the run's {total_steps} steps; "
            f"warming up over all {total_steps} steps instead",
            stacklevel=1,
        )  # one warning per run
        warmup = total_steps
    decay_steps = 0
    if kind == "wsd":
        if not 0.0 <= float(opt_cfg.decay_fraction) <= 1.0:
            raise ValueError(f"optimizer.decay_fraction must be in [0, 1], got {opt_cfg.decay_fraction}")
        decay_steps = min(round(float(opt_cfg.decay_fraction) * total_steps), total_steps - warmup)
    decay_start = total_steps - decay_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        if kind == "constant":
            after = jnp.full_like(step, peak)
        elif kind == "cosine":
            p = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        else:  # wsd
            p = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
            after = peak + (floor - peak) * p
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw`` with decay masked to ``ndim >= 2`` leaves (any pytree)."""
    # A callable mask is evaluated on the params pytree at init, so it works for nnx.State, dicts, ...
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    adamw = optax.adamw(
        learning_rate=make_schedule(opt_cfg, total_steps),
        b1=float(opt_cfg.b1),
        b2=float(opt_cfg.b2),
        eps=float(opt_cfg.eps),
        weight_decay=float(opt_cfg.weight_decay),
        mask=decay_mask,
    )
    if opt_cfg.get("moment_dtype"):
        adamw = store_state_in(adamw, opt_cfg.moment_dtype)
    if not opt_cfg.clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(float(opt_cfg.clip_norm)), adamw)


def store_state_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``inner`` with its floating-point state (AdamW's two moments; its step counts are integers)
    stored in ``dtype`` between steps and cast to float32 for the update."""
    dtype = jnp.dtype(dtype)

    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def check_optimizer_config(opt_cfg) -> None:
    """Refuses values that train nonsense silently (a negative lr ascends the loss)."""
    c = opt_cfg
    checks = [
        ("lr", math.isfinite(float(c.lr)) and float(c.lr) >= 0, "a finite number >= 0"),
        ("warmup_steps", int(c.warmup_steps) >= 0, ">= 0"),
        ("min_lr_ratio", 0.0 <= float(c.min_lr_ratio) <= 1.0, "in [0, 1]"),
        ("b1", 0.0 <= float(c.b1) < 1.0, "in [0, 1)"),
        ("b2", 0.0 <= float(c.b2) < 1.0, "in [0, 1)"),
        ("eps", float(c.eps) > 0, "> 0"),
        ("weight_decay", float(c.weight_decay) >= 0, ">= 0"),
        ("clip_norm", not c.clip_norm or float(c.clip_norm) > 0, "> 0 (or 0/None: no clipping)"),
        ("moment_dtype", c.get("moment_dtype") in (None, "float32", "bfloat16"), "unset, float32 or bfloat16"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"optimizer.{name} must be {want}, got {c[name]}")
