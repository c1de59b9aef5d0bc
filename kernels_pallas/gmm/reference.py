"""Plain-jnp grouped matmul: a dense loop over groups with row masks (test oracle, not fast)."""

import jax.numpy as jnp


def _group_masks(group_sizes, m):
    ends = jnp.cumsum(group_sizes)  # [G]
    rows = jnp.arange(m)
    return (rows[None, :] >= ends[:, None] - group_sizes[:, None]) & (rows[None, :] < ends[:, None])  # [G, m]


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None):
    """out[r] = lhs[r] @ rhs[g(r)]; rows past sum(group_sizes) are zero. lhs [m, k], rhs [G, k, n]."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    masks = _group_masks(group_sizes, lhs.shape[0])  # [G, m]
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)  # [m, n]
    for g in range(rhs.shape[0]):
        out = out + jnp.where(masks[g][:, None], jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32), 0)
    return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(lhs, grad, group_sizes, *, preferred_element_type=None):
    """out[g] = lhs[rows of g]^T @ grad[rows of g]. lhs [m, k], grad [m, n] -> [G, k, n]."""
    masks = _group_masks(group_sizes, lhs.shape[0])  # [G, m]
    out = [
        jnp.dot(jnp.where(masks[g][:, None], lhs, 0).T, grad, preferred_element_type=jnp.float32)
        for g in range(group_sizes.shape[0])
    ]
    return jnp.stack(out).astype(preferred_element_type or lhs.dtype)  # [G, k, n]
