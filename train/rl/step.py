"""The jitted pieces of a GRPO step: the policy update and the no-gradient log-prob forward.

A rollout batch (built on the host by ``train/rl/trainer.py``) is a dict of arrays::

    tokens      [b, L] int32  prompt + completion, right-padded (0 after the last real token)
    mask        [b, L-1] f32  1 where the target tokens[:, i+1] is a completion token (trained on)
    advantages  [b] f32       group-normalised advantage of each completion (grpo.group_advantages)
    old_logp    [b, L-1] f32  log pi_old of each target (only when mu > 1; see below)
    ref_logp    [b, L-1] f32  log pi_ref of each target (only when beta > 0)

On a mesh (``train/sharding.py``) both run as ``sharding.MeshJit``: the state keeps the shardings
``state_sh`` of the logical-axis rules, the batch's rows are split over (data, fsdp, expert), and the
MoE layers take the mesh's expert-parallel layout, as in the language-model step (``train/step.py``).

With mu = 1 the single update starts at the old policy, so pi_old = stop_gradient(pi_theta) exactly
(rho = 1) and no separate forward is needed; with mu > 1 the old log-probs are computed once before
the first update and the later updates see rho != 1 (DeepSeekMath Alg. 1, the mu loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import sharding
from train.rl import grpo


def make_logprob_fn(graphdef, temperature: float, mesh, state_sh) -> sharding.MeshJit:
    """jit (params, rest, tokens [b, L]) -> log-probs [b, L-1] of the next tokens (no gradient);
    (params, rest) placed as the policy's ``state_sh["params"]``, ``state_sh["rest"]`` (the
    reference's are the same)."""
    ep, rows = sharding.expert_parallel(mesh), sharding.batch_sharding(mesh)

    def fn(params, rest, tokens):
        return grpo.sequence_logprobs(nnx.merge(graphdef, params, rest), tokens, temperature, ep=ep)[0]

    return sharding.MeshJit(fn, mesh, in_shardings=(state_sh["params"], state_sh["rest"], rows), out_shardings=rows)


def make_update_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    temperature: float,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    aggregation: str,
    mesh,
    state_sh,
) -> sharding.MeshJit:
    """jit (state, batch) -> (state, metrics): one optimizer step on -J (``grpo.grpo_loss``); the
    state in and out with ``state_sh`` (donated), the batch's rows split over the batch axes."""
    ep = sharding.expert_parallel(mesh)

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logp, entropy = grpo.sequence_logprobs(model, batch["tokens"], temperature, ep=ep)  # [b, L-1]
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
        out = grpo.grpo_loss(
            logp,
            old,
            batch["advantages"],
            batch["mask"],
            ref_logp=batch.get("ref_logp"),
            beta=beta,
            eps_low=epsilon,
            eps_high=epsilon_high,
            aggregation=aggregation,
        )
        n = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
        metrics = {
            "loss": out.loss,
            "kl": out.kl,
            "clip_fraction": out.clip_fraction,
            "ratio_mean": out.ratio_mean,
            "entropy": jnp.sum(entropy * batch["mask"]) / n,
        }
        return out.loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state, batch):
        (_, metrics), grads = grad_fn(state["params"], state["rest"], batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            **state,
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        return new_state, {**metrics, "grad_norm": grad_norm}

    return sharding.MeshJit(
        update,
        mesh,
        donate_argnums=(0,),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
