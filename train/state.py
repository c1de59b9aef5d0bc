"""The train state: everything a step reads and writes, as one pytree of arrays.

``params`` (nnx.Param leaves, what the optimizer sees), ``opt_state`` (Adam moments, count),
``rest`` (non-Param model state: the router selection biases), ``step``, ``rng``
(key data) and ``skipped`` (non-finite steps so far). The model's structure (``graphdef``) is
static and lives outside, so the step is a pure function of arrays.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer


def init_model(cfg: ModelConfig, seed: int):
    """(graphdef, params, rest) of a freshly initialised model."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, ...)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int):
    graphdef, params, rest = init_model(cfg, seed)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rest": rest,
        "rng": jax.random.key_data(jax.random.key(seed)),
        "skipped": jnp.zeros((), jnp.int32),
    }
    return graphdef, state


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> tuple[Any, Any]:
    """Shapes and dtypes of ``init_state`` without allocating (for restore targets)."""
    out = {}

    def make():
        g, s = init_state(cfg, tx, seed)
        out["graphdef"] = g
        return s

    shapes = jax.eval_shape(make)
    return out["graphdef"], shapes
