"""Dispatch: sort the (token, slot) assignments by expert into a buffer, and put results back.

One function for every case. The E routed experts live on ``n_dest`` destinations (n_dest = 1: this
device; n_dest = n: the devices of the ``expert`` mesh axis, destination j holding experts
[j E_l, (j + 1) E_l), E_l = E / n). The buffer has ``rows`` rows per destination, [n_dest * rows]
in all; destination j's block holds its kept assignments sorted by expert, then empty rows:

  1. sort the m*k assignments by expert id (stable: token order inside an expert; padding tokens
     sort last and are never sent)
  2. capacity: an expert keeps its first ``capacity`` assignments (None = all, dropless); the rest
     are dropped (they contribute zero; the token keeps its shared experts and residual)
  3. row of an assignment = j * rows + (kept rows of earlier experts of j) + (rank in its expert)

``gather`` fills the buffer from the tokens, the grouped matmul runs on it (``group_sizes``: kept
rows per expert), ``scatter_back`` reads each assignment's result back (zero if not computed).
Only int vectors are scattered; the [rows, d] activations move by gathers, in the backward too:
``src`` and ``slot`` are inverse maps (buffer row <-> assignment), so the transpose of each gather
is a gather by the other map (``custom_vjp``), where autodiff would scatter-add into a zeroed
[rows, d] buffer (memory the scheduler may allocate long before it is used). The plain
``.at[].get`` forms, differentiated by JAX, are the references (``*_reference``).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
    src: jax.Array  # [n_dest * rows] flat assignment (token * k + slot) of each buffer row; m*k = empty
    slot: jax.Array  # [m*k] buffer row of each assignment; >= n_dest * rows: not computed
    local_expert: jax.Array  # [n_dest * rows] expert id within its destination; E_l = empty row
    group_sizes: jax.Array  # [E] kept rows per expert
    dropped: jax.Array  # scalar int32: valid assignments not computed


def expert_capacity(capacity_factor: float | None, m: int, k: int, n_experts: int) -> int | None:
    """Rows each expert keeps of m tokens' assignments: ceil(C * m * k / E), or None (dropless)."""
    if capacity_factor is None:
        return None
    return max(1, int(math.ceil(capacity_factor * m * k / n_experts)))


def buffer_rows(m: int, k: int, n_experts: int, n_dest: int, capacity: int | None) -> int:
    """Rows per destination that can never overflow: a token sends at most min(k, E_l) assignments to
    one destination (its k experts are distinct), and a destination keeps at most E_l * capacity."""
    e_local = n_experts // n_dest
    rows = m * min(k, e_local)
    return rows if capacity is None else min(rows, e_local * capacity)


def plan(ids: jax.Array, valid: jax.Array, n_experts: int, n_dest: int, capacity: int | None, rows: int) -> Plan:
    """ids [m, k] expert per assignment, valid [m] bool -> Plan (see the module docstring)."""
    mk, e_local = ids.size, n_experts // n_dest
    valid_a = jnp.broadcast_to(valid[:, None], ids.shape).reshape(mk)  # [m*k]
    key = jnp.where(valid_a, ids.reshape(mk), n_experts)  # sentinel E for padding
    order = jnp.argsort(key, stable=True)  # [m*k] sorted position -> assignment
    skey = key[order]
    ekey = jnp.minimum(skey, n_experts - 1)
    counts = jnp.zeros((n_experts + 1,), jnp.int32).at[skey].add(1)[:n_experts]  # [E]
    rank = jnp.arange(mk) - (jnp.cumsum(counts) - counts)[ekey]  # position inside its expert
    real = skey < n_experts
    kept = counts if capacity is None else jnp.minimum(counts, capacity)  # [E]
    keep = real if capacity is None else real & (rank < capacity)
    before = jnp.cumsum(kept) - kept  # [E] kept rows of all lower experts
    within = before - before[(jnp.arange(n_experts) // e_local) * e_local]  # ... of lower experts on j
    total = n_dest * rows
    # Buffer row of each sorted assignment; the ones not computed get distinct rows past the buffer,
    # so every index below is unique (cheap scatters and transposes) and out-of-bounds reads give 0.
    row = jnp.where(keep, (ekey // e_local) * rows + within[ekey] + rank, total + jnp.arange(mk)).astype(jnp.int32)
    slot = jnp.zeros((mk,), jnp.int32).at[order].set(row, unique_indices=True)
    src = jnp.full((total,), mk, jnp.int32).at[row].set(order.astype(jnp.int32), mode="drop", unique_indices=True)
    local = jnp.full((total,), e_local, jnp.int32).at[row].set(ekey % e_local, mode="drop", unique_indices=True)
    dropped = jnp.sum(real & ~keep).astype(jnp.int32)
    return Plan(src, slot, local, kept, dropped)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Rows x[idx] with zeros for out-of-range idx: x [n, d], idx [r] -> [r, d]."""
    return x.at[idx].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather(x: jax.Array, src: jax.Array, slot: jax.Array, k: int) -> jax.Array:
    """Buffer rows from token rows: x [m, d] -> [r, d], row i = x[src[i] // k] (zero for empty rows,
    src = m*k). ``slot`` (the inverse map) is used by the backward only."""
    return _take(x, src // k)


def _gather_fwd(x, src, slot, k):
    return gather(x, src, slot, k), (src, slot)


def _gather_bwd(k, res, g):
    src, slot = res
    m = slot.shape[0] // k
    # d x[t] = sum_j g[slot[t*k + j]] over the token's k assignments (zero for those not computed)
    dx = _take(g, slot).reshape(m, k, g.shape[-1]).sum(1, dtype=jnp.float32)  # [m, d]
    return dx.astype(g.dtype), None, None


gather.defvjp(_gather_fwd, _gather_bwd)


@jax.custom_vjp
def scatter_back(y: jax.Array, src: jax.Array, slot: jax.Array) -> jax.Array:
    """Each assignment's result: y [r, d] buffer rows -> [m*k, d], row a = y[slot[a]] (zero if not
    computed). ``src`` (the inverse map) is used by the backward only."""
    return _take(y, slot)


def _scatter_back_fwd(y, src, slot):
    return scatter_back(y, src, slot), (src, slot)


def _scatter_back_bwd(res, g):
    src, _ = res
    return _take(g, src), None, None  # d y[i] = g[src[i]]: slot is one-to-one, empty rows get 0


scatter_back.defvjp(_scatter_back_fwd, _scatter_back_bwd)


def gather_reference(x: jax.Array, src: jax.Array, k: int) -> jax.Array:
    """``gather`` as plain jnp (JAX's own transpose: a scatter-add into zeros)."""
    return _take(x, src // k)


def scatter_back_reference(y: jax.Array, slot: jax.Array) -> jax.Array:
    """``scatter_back`` as plain jnp."""
    return y.at[slot].get(mode="fill", fill_value=0, unique_indices=True)
