"""Tiny configurations shared by the tests."""

import glob
import importlib.util
import os

from model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every experiment config file (configs/base.py is their shared builder, not an experiment).
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_") and os.path.basename(p) != "base.py"
)


# A few-thousand-parameter DeepSeek-V3-shaped model (both latents, groups, shared expert, MTP): the
# one tiny model of the tests; a test changes only the fields it is about.
TINY = dict(
    vocab_size=64,
    d_model=32,
    n_layers=3,
    first_k_dense=1,
    dense_ffn_dim=48,
    n_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    n_experts_per_tok=2,
    moe_ffn_dim=16,
    n_group=4,
    topk_group=2,
    mtp_depth=1,
    max_seq_len=64,
    moe_block_rows=8,
)


def tiny_config(**kw) -> ModelConfig:
    """``TINY`` with the fields in ``kw`` replaced."""
    return ModelConfig(**{**TINY, **kw})


def load_config_file(path: str):
    """``get_config()`` of an experiment config file (``configs/*.py`` or a generated one)."""
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def grad_capture():
    """An optax transformation that applies no update and keeps the last gradient as its state:
    a train step with it exposes the exact accumulated gradient in ``state["opt_state"]``."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )
