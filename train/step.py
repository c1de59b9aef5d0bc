"""The jitted train and eval steps: pure functions of (state, batch).

One optimizer step: split the global batch into ``microbatches``, sum their gradients with a
``lax.scan`` (gradient accumulation: each microbatch's token losses are divided by the valid-token
counts of the whole global batch, so the sum is the big batch's mean however unequally the
microbatches are filled), clip + AdamW, then the aux-loss-free router-bias update from the expert
loads summed over the whole global batch (DeepSeek-V3 report Sec. 2.1.2). A step whose loss or
gradient is not finite changes nothing except the ``skipped`` counter.
"""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.balance import load_shape, max_violation, update_router_biases
from model.loss import lm_losses, loss_token_counts, token_cross_entropy
from train import memory, sharding


def _split_micro(batch: dict, n: int) -> dict:
    """[b, ...] -> [n, b/n, ...], microbatch i = rows i, i+n, ...: strided, so that with the batch
    split over devices every microbatch takes rows from each device's own block (no resharding)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, train_cfg, ep=None):
    """``ep``: ``model.moe_ep.ExpertParallel`` of the mesh the step runs on (None: one device)."""
    mtp_w, alpha, gamma = train_cfg.mtp_loss_weight, train_cfg.balance_loss_alpha, train_cfg.bias_update_rate
    n_micro = train_cfg.microbatches
    aux_alpha = train_cfg.get("aux_loss_alpha", 0.0)  # classic batch-wise loss (model/balance.py), off by default

    def loss_fn(params, rest, mb, token_counts):
        # Fresh Variables owned by this trace: under jax.grad, ``rest`` (router biases) is traced by
        # the outer jit and ``params`` by grad, and ``nnx.scan`` (``scan_layers``) refuses Variables
        # of another trace level.
        model = nnx.merge(graphdef, params, rest, copy=True)
        out = model(mb["inputs"], mb["positions"], mb["segment_ids"], train=True, ep=ep)
        losses = lm_losses(out, mb, mtp_w, token_counts)
        balance = alpha * out.aux["balance_loss"] / n_micro  # a mean over rows: each microbatch has b/n
        if aux_alpha:
            balance = balance + aux_alpha * out.aux["batch_balance_loss"] / n_micro
        loss = losses["main_loss"] + losses["mtp_loss"] + balance
        metrics = {
            "loss": loss,
            "main_loss": losses["main_loss"],
            "mtp_loss": losses["mtp_loss"],
            "balance_loss": balance,
            "dropped_tokens": out.aux["dropped"].astype(jnp.float32),
        }
        return loss, (metrics, out.aux["expert_load"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        params, rest = state["params"], state["rest"]
        micro = _split_micro(batch, n_micro)
        shapes = nnx.merge(graphdef, params, rest)
        token_counts = loss_token_counts(batch, shapes.cfg.mtp_depth)  # [1 + D], of the global batch

        def accumulate(carry, mb):
            g_acc, m_acc, load_acc = carry
            (_, (m, load)), g = grad_fn(params, rest, mb, token_counts)
            add = lambda a, b: a + b
            return (jax.tree.map(add, g_acc, g), jax.tree.map(add, m_acc, m), jax.tree.map(add, load_acc, load)), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)  # f32 sums (V3 report Sec. 3.3)
        zeros_m = {
            k: jnp.zeros((), jnp.float32) for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "dropped_tokens")
        }
        zeros_l = jnp.zeros(load_shape(shapes), jnp.float32)  # [l, e]
        (grads, metrics, loads), _ = jax.lax.scan(accumulate, (zeros_g, zeros_m, zeros_l), micro)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)

        # Aux-loss-free bias update from the global batch's per-expert loads [l, e]. copy=True: merge
        # shares the Variables of ``rest``, and the update would write into the ``rest`` that a
        # non-finite step keeps (its biases then moved anyway).
        model = nnx.merge(graphdef, new_params, rest, copy=True)
        if gamma:
            update_router_biases(model, loads, gamma)
        new_rest = nnx.state(model, nnx.Not(nnx.Param))

        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "rest": keep(new_rest, rest),
            "rng": state["rng"],
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics.update(
            grad_norm=grad_norm,
            finite=finite,
            maxvio=max_violation(loads),
            expert_load=loads / jnp.maximum(loads.sum(-1, keepdims=True), 1.0),
        )
        return new_state, metrics

    return train_step


def sharded_train_step(
    graphdef, tx: optax.GradientTransformation, train_cfg, mesh, state_sh, *, donate: bool = True
) -> sharding.MeshJit:
    """``make_train_step`` jitted on ``mesh``: state in and out with ``state_sh``, the batch split over
    the batch axes, metrics replicated; the input state is donated unless ``donate=False``. On CPU
    it is compiled with XLA:CPU's memory-minimising scheduler (``train/memory.py``)."""
    step = make_train_step(graphdef, tx, train_cfg, sharding.expert_parallel(mesh))
    return sharding.MeshJit(
        step,
        mesh,
        compiler_options=memory.compiler_options(mesh.devices.flat[0].platform),
        donate_argnums=(0,) if donate else (),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )


def make_eval_step(graphdef, ep=None):
    """Dropless (``train=False``) evaluation sums; ``ep`` as in ``make_train_step``."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch["inputs"], batch["positions"], batch["segment_ids"], ep=ep)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = token_cross_entropy(out.logits, batch["targets"])
        return {
            "nll_sum": jnp.sum(nll * mask),
            "tokens": jnp.sum(mask),
            "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32) * mask),
        }

    return eval_step


def eval_metrics(sums: dict) -> dict:
    loss = sums["nll_sum"] / max(sums["tokens"], 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_bits_per_byte": sums["nll_sum"] / math.log(2) / max(sums["bytes"], 1.0),
    }
