"""Training keeps float32 master weights, Adam moments and gradient sums (DeepSeek-V3 report
Sec. 3.3): with every training config, and the fine-tune config ``tools.convert_hf`` writes, one
optimizer update of 1e-5 relative size moves a norm scale (bf16 storage rounds it away)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from model import hf
from model.config import ModelConfig
from model.transformer import Transformer
from tests.util import CONFIG_FILES, load_config_file, tiny_config
from train.optimizer import default_optimizer_config, make_optimizer
from train.state import abstract_state, init_state
from train.step import make_train_step
from train.synthetic import synthetic_batches

UPDATE = 1e-5  # relative size of the one update: below bf16's resolution at 1.0 (2^-8), above f32's
F32 = jnp.dtype(jnp.float32)


def _tiny_like(cfg: ModelConfig) -> ModelConfig:
    """A tiny model (byte vocabulary) with ``cfg``'s parameter and compute dtypes."""
    return tiny_config(vocab_size=264, param_dtype=cfg.param_dtype, dtype=cfg.dtype)


def _batch():
    return {k: jnp.asarray(v) for k, v in synthetic_batches(4, 16, 1)[0].items()}


def _adam_states(opt_state) -> list:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]


def _check_master_weights(config):
    """The train state the trainer builds from ``config`` (model shrunk, so only traced), and one
    update of its optimizer, lr replaced by a constant UPDATE, on a norm scale (1.0) of that state's
    dtype: every element moves by ~UPDATE (Adam's first step moves each by ~lr)."""
    opt = config.optimizer.to_dict()
    opt.update(lr=UPDATE, schedule="constant", warmup_steps=0)
    tx = make_optimizer(ml_collections.ConfigDict(opt), config.train.steps)
    cfg = _tiny_like(ModelConfig.from_dict(config.model.to_dict()))
    _, abstract = abstract_state(cfg, tx, seed=0)
    (want,) = jax.tree.leaves(abstract["params"]["final_norm"]["scale"])
    params = {"scale": jnp.ones(want.shape, want.dtype)}
    grads = {"scale": jnp.linspace(-0.1, 0.1, want.shape[0]) + 0.05}  # f32, as the step accumulates them
    updates, _ = tx.update(grads, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["scale"], np.float64)
    moved = np.abs(new - 1.0) / UPDATE
    assert moved.min() > 0.5 and moved.max() < 1.5, (
        f"param_dtype={cfg.param_dtype}: a {UPDATE} update moved the norm scale by "
        f"{moved.min() * UPDATE:.3g}..{moved.max() * UPDATE:.3g}"
    )
    # Adam moments of the whole state in float32, unless optimizer.moment_dtype opts them into bf16.
    (adam,) = _adam_states(abstract["opt_state"])
    want = jnp.dtype(opt.get("moment_dtype") or F32)
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {want}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {want}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_training_configs_keep_f32_master_weights(path):
    _check_master_weights(load_config_file(path))


def test_finetune_config_of_converted_bf16_weights_trains_in_f32(tmp_path):
    """``tools.convert_hf import`` of a bf16 Hugging Face checkpoint: float32 weights in the
    checkpoint, param_dtype float32 in the fine-tune config, compute dtype left "auto"."""
    from tools import convert_hf

    src, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    bf16 = tiny_config(vocab_size=264, param_dtype="bfloat16", dtype="bfloat16")
    hf.save_pretrained(Transformer(bf16, rngs=nnx.Rngs(0)), src)
    convert_hf.import_hf(src, ckpt)
    weights = nnx.state(convert_hf.load_model(ckpt), nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(weights)} == {F32}
    config = load_config_file(os.path.join(ckpt, "finetune_config.py"))
    assert config.model.dtype == "auto" and config.model.param_dtype == "float32"
    assert config.kernels.impl == config.model.kernels_impl == "auto"  # the switch is left to the user
    _check_master_weights(config)


def test_microbatch_gradients_are_summed_in_f32():
    """The accumulation carry of the microbatch scan is float32 even for bf16 parameters."""
    cfg = tiny_config(vocab_size=264, param_dtype="bfloat16", dtype="bfloat16")
    tx = make_optimizer(default_optimizer_config(), 100)
    graphdef, state = init_state(cfg, tx, seed=0)
    train_cfg = ml_collections.ConfigDict(
        dict(mtp_loss_weight=0.3, balance_loss_alpha=1e-4, bias_update_rate=1e-3, microbatches=2)
    )
    jaxpr = jax.make_jaxpr(make_train_step(graphdef, tx, train_cfg))(state, _batch()).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    n_params = len(jax.tree.leaves(state["params"]))
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(state["params"])}
    assert {jnp.dtype(v.aval.dtype) for v in scan.outvars[:n_params]} == {F32}


def test_trainer_refuses_low_precision_master_weights(tmp_path):
    from configs.base import build
    from train.trainer import train_and_evaluate

    config = build("moe_tiny")
    config.model.param_dtype = "bfloat16"
    config.train.update(
        steps=1, global_batch_size=2, eval_batches=1, peak_flops=1e12, progress=False, tracker="none"
    )  # bounded, should the check ever be gone
    config.data.seq_len = 32
    config.optimizer.warmup_steps = 0
    with pytest.raises(ValueError, match=r"model.param_dtype='bfloat16': training keeps float32 parameters"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_moments_may_opt_into_bf16():
    """optimizer.moment_dtype=bfloat16 (the report's BF16 moments) leaves the weights in f32, and one
    update equals the f32-state update up to the bf16 rounding of the stored moments."""
    from configs.base import build

    config = build("moe_tiny")
    config.optimizer.moment_dtype = "bfloat16"
    _check_master_weights(config)

    f32, bf16 = config.optimizer.copy_and_resolve_references(), config.optimizer
    f32.moment_dtype = None
    params = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(16, 16)}
    grads = [{"w": jnp.cos(jnp.arange(256.0) * (k + 1)).reshape(16, 16) * 1e-2} for k in range(3)]
    news = []
    for opt in (f32, bf16):
        tx, p = make_optimizer(opt, total_steps=10), params
        state = tx.init(p)
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        news.append(np.asarray(p["w"]))
    (adam,) = _adam_states(state)
    assert adam.mu["w"].dtype == adam.nu["w"].dtype == jnp.bfloat16
    step = np.abs(news[0] - np.asarray(params["w"]))  # three updates, lr ~1e-4 .. 1e-3
    # Storing m and v in bf16 (relative rounding <= 2^-9 each time they are stored) perturbs each
    # update m/sqrt(v) by a fraction ~2^-9 of the update's own scale; where the three updates
    # cancel, that is not small against the net step, so the bound is against the largest step.
    diff = np.abs(news[1] - news[0])
    assert diff.max() > 0, "bf16 moments must round somewhere (else the cast is not applied)"
    assert diff.max() <= 2**-8 * step.max(), (diff.max(), step.max())
