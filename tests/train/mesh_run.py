"""A few training steps of a config on its mesh, through the trainer's own pieces
(``sharding.create``, ``sharded_train_step``, ``sharding.global_batch``), keeping each step's
metrics and raw gradients: shared by the mesh tests (test_parallel_equivalence, test_pod_miniature)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config import ModelConfig
from train import sharding
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state
from train.step import sharded_train_step
from train.synthetic import synthetic_batches


def record_grads() -> optax.GradientTransformation:
    """Passes the gradients through unchanged and keeps the last ones as its state (put first in
    the chain: the raw gradients, before clipping)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params), lambda grads, state, params=None: (grads, grads)
    )


def run_steps(c, steps: int, grad_steps: int) -> dict:
    """``steps`` optimizer steps of config ``c`` on the mesh ``c.mesh`` from ``c.train.seed``: scalar
    metrics per step, the raw gradients of the first ``grad_steps`` steps, the final params and
    non-Param state (numpy), the mesh and the compiled step's HLO text."""
    mesh = sharding.make_mesh(c.mesh)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    sharding.check_fits(sizes, cfg, global_batch_size=c.train.global_batch_size, microbatches=c.train.microbatches)
    tx = optax.chain(record_grads(), make_optimizer(c.optimizer, c.train.steps))
    graphdef, abstract = abstract_state(cfg, tx, c.train.seed)
    state_sh = sharding.tree_shardings(abstract, mesh)
    state = sharding.create(lambda: init_state(cfg, tx, c.train.seed)[1], state_sh, mesh)
    step = sharded_train_step(graphdef, tx, c.train, mesh, state_sh, donate=False)
    batches = synthetic_batches(c.train.global_batch_size, c.data.seq_len, steps, 0)
    batches = [sharding.global_batch(b, mesh) for b in batches]
    compiled = step.lower(state, batches[0]).compile()
    metrics, grads = [], []
    for b in batches:
        with jax.set_mesh(mesh):
            state, m = compiled(state, b)
        metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
        grads.append(jax.tree.map(np.asarray, state["opt_state"][0]))
    return dict(
        metrics={k: np.array([m[k] for m in metrics]) for k in metrics[0]},
        grads=grads[:grad_steps],
        alpha=c.train.balance_loss_alpha,
        mesh=mesh,
        hlo=compiled.as_text(),
        params=jax.tree.map(np.asarray, state["params"]),
        rest=jax.tree.map(np.asarray, state["rest"]),
    )


def leaves(tree) -> list[tuple[str, np.ndarray]]:
    """(path, array) of every leaf, in tree order."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| (a constant scale error s in a shows as |s - 1| whatever b's magnitude)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
