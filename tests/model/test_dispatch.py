"""Dispatch gathers (``model/dispatch.py``): the custom-VJP ``gather`` / ``scatter_back`` against
their plain-jnp references, forward and gradients, with padding, drops and empty expert groups;
and the backward holds no scatter into a zeroed buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import dispatch
from tests.tolerances import assert_close

M, K, E, D = 13, 3, 6, 5


def _plan(capacity_factor, n_dest=1, seed=0):
    # k distinct experts per token among the first E - 1: the last expert's group stays empty
    ids = jnp.argsort(jax.random.uniform(jax.random.key(seed), (M, E - 1)), -1)[:, :K]  # [m, k]
    valid = jnp.arange(M) % 4 != 0  # some padding tokens
    cap = dispatch.expert_capacity(capacity_factor, M, K, E)
    return dispatch.plan(ids, valid, E, n_dest, cap, dispatch.buffer_rows(M, K, E, n_dest, cap))


def _losses(p):
    w = jax.random.normal(jax.random.key(3), (M * K, D))

    def fast(x):
        y_buf = jnp.sin(dispatch.gather(x, p.src, p.slot, K))  # [R, d]
        return jnp.sum(dispatch.scatter_back(y_buf, p.src, p.slot) * w)

    def ref(x):
        y_buf = jnp.sin(dispatch.gather_reference(x, p.src, K))
        return jnp.sum(dispatch.scatter_back_reference(y_buf, p.slot) * w)

    return fast, ref


@pytest.mark.parametrize("capacity_factor,n_dest", [(None, 1), (0.5, 1), (None, 2), (0.7, 2)])
def test_gathers_match_reference_forward_and_grad(capacity_factor, n_dest):
    p = _plan(capacity_factor, n_dest)
    assert int(p.group_sizes[E - 1]) == 0  # an empty expert group
    if capacity_factor is not None:
        assert int(p.dropped) > 0  # dropped assignments must get zero gradient, not garbage
    x = jax.random.normal(jax.random.key(1), (M, D))
    fast, ref = _losses(p)
    assert_close(dispatch.gather(x, p.src, p.slot, K), dispatch.gather_reference(x, p.src, K))
    assert_close(fast(x), ref(x))
    g_fast, g_ref = jax.grad(fast)(x), jax.grad(ref)(x)
    assert_close(g_fast, g_ref)
    assert float(jnp.abs(g_ref).sum()) > 0
    valid = np.arange(M) % 4 != 0
    assert np.all(np.asarray(g_fast)[~valid] == 0)  # padding tokens are never dispatched


@pytest.mark.parametrize("capacity_factor,n_dest", [(None, 2), (0.5, 1)])
def test_transposes_match_reference_for_any_cotangent(capacity_factor, n_dest):
    """Cotangents on every row, empty buffer rows and dropped / padding assignments included: they
    must contribute nothing (a clamped index instead of a zero fill would leak them)."""
    p = _plan(capacity_factor, n_dest)
    x = jax.random.normal(jax.random.key(1), (M, D))
    y = jax.random.normal(jax.random.key(2), (p.src.shape[0], D))
    g_buf = jax.random.normal(jax.random.key(4), (p.src.shape[0], D))  # [R, d]
    g_asg = jax.random.normal(jax.random.key(5), (M * K, D))  # [m*k, d]
    vjp = lambda f, a, g: jax.vjp(f, a)[1](g)[0]
    assert_close(
        vjp(lambda a: dispatch.gather(a, p.src, p.slot, K), x, g_buf),
        vjp(lambda a: dispatch.gather_reference(a, p.src, K), x, g_buf),
    )
    assert_close(
        vjp(lambda a: dispatch.scatter_back(a, p.src, p.slot), y, g_asg),
        vjp(lambda a: dispatch.scatter_back_reference(a, p.slot), y, g_asg),
    )


def test_backward_has_no_scatter():
    """The transposes are gathers: no scatter (into a zeroed [rows, d] buffer) in the gradient."""
    p = _plan(None)
    fast, ref = _losses(p)
    x = jnp.ones((M, D))
    assert "scatter" not in jax.jit(jax.grad(fast)).lower(x).as_text()
    assert "scatter" in jax.jit(jax.grad(ref)).lower(x).as_text()  # what autodiff would do
