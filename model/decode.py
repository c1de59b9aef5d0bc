"""The KV cache and the cached forward pass; the per-token reference generation loop.

``hidden_cached`` / ``forward_cached`` run the main model over new tokens at given positions,
writing their cache slots; ``mtp_cached`` does the same for MTP module 1 (speculative decoding).
``model/generation.py`` builds the compiled generation loop from these; ``generate_reference``
(prefill, then one jitted step per token with the host in between) is the loop it replaced, kept
as the reference the tests compare with.

Two caches, same model:

* ``"absorbed"`` (MLA's point; DeepSeek-V2 report Sec. 2.1.1, DeepSeek's reference ``attn_impl =
  "absorb"``): per token and layer only the normalised latent c_KV [c] and the rotated shared rope
  key k_rope [r], i.e. (c + r) numbers (576 for DeepSeek-V3). W_UK is folded into the query and
  W_UV applied after attention, so keys and values are never materialised:

      q_lat = q_nope W_UK^T                 [b, t, h, c]   (W_UK = wkv_b[:, :, :n])
      score = (q_lat . c_KV + q_rope . k_rope) * scale     [b, h, t, s]
      o     = (softmax(score) c_KV) W_UV    [b, t, h, v]   (W_UV = wkv_b[:, :, n:])

* ``"naive"``: the expanded per-head keys [h, n + r] and values [h, v] (h (n + r + v) numbers per
  token and layer, 40960 for DeepSeek-V3), attention as in ``MLA.__call__``. For comparison only.

A grouped-query attention model (``attention_type = "gqa"``, ``model/gqa.py``) has one cache,
whichever ``kind``: the rotated keys and the values of its j KV heads, [j, k] each (2 j k numbers
per token and layer: 2 x 8 x 128 = 2048 for Llama-3.1-8B). The p = h / j query heads of a group
read their KV head in place (a grouped einsum); nothing is repeated.

Batching: prompts are right-padded to a common length; row i's token j sits in cache slot j at
position j, so a query at position p attends to slots <= p (padding slots past a prompt's end are
overwritten by that row's generated tokens before any query can see them). Only the main model's
layers are counted: plain generation never runs the MTP modules, so cache bytes per token are
(c + r) x n_layers x dtype bytes (``cache_bytes_per_token``); speculative decoding adds one layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import sampling as sampling_lib
from model.config import ModelConfig
from model.decode_experts import SplitExperts, small_batch_moe, split_experts
from model.fp8_weights import dense
from model.gqa import GQA
from model.linear import linear
from model.mla import MLA
from model.rope import rope_angles
from model.sampling import Sampling
from model.transformer import Transformer

KINDS = ("absorbed", "naive")


# ---- the cache ----


def cache_shapes(cfg: ModelConfig, kind: str) -> dict:
    """Per-token, per-layer cache entries: name -> trailing shape."""
    h, n, r, v, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if kind in KINDS and cfg.attention_type == "gqa":  # one per-KV-head cache (module docstring)
        return {"k": (cfg.kv_heads, cfg.attn_head_dim), "v": (cfg.kv_heads, cfg.attn_head_dim)}
    if kind == "absorbed":
        return {"c_kv": (c,), "k_rope": (r,)}
    if kind == "naive":
        return {"k": (h, n + r), "v": (h, v)}
    raise ValueError(f"cache must be one of {KINDS}, got {kind!r}")


def cache_bytes_per_token(cfg: ModelConfig, kind: str) -> int:
    """Bytes one token occupies in the cache over all main-model layers (MTP layers not cached)."""
    per_layer = sum(int(np.prod(s)) for s in cache_shapes(cfg, kind).values())
    return per_layer * cfg.n_layers * jnp.dtype(cfg.dtype).itemsize


def init_layer_cache(cfg: ModelConfig, batch: int, length: int, kind: str) -> dict:
    """One layer's cache: name -> [b, length, ...] zeros in the compute dtype."""
    return {k: jnp.zeros((batch, length) + s, cfg.dtype) for k, s in cache_shapes(cfg, kind).items()}


def init_cache(cfg: ModelConfig, batch: int, length: int, kind: str) -> tuple:
    """One dict per main-model layer."""
    return tuple(init_layer_cache(cfg, batch, length, kind) for _ in range(cfg.n_layers))


# ---- weights in the decode step's layout ----


class LayerWeights(NamedTuple):
    """W_UK and W_UV with the heads leading, as the absorbed step's batched dots over h read them.
    ``decode_weights`` makes them once outside the decoding loop: made inside the step (from
    wkv_b [c, h, n+v]), XLA:CPU transposes both in every step: 3-6x the time of the two products
    (docs/benchmarks.md, "Generation")."""

    w_uk: jax.Array | None  # [h, n, c] W_UK = wkv_b[:, :, :n]; None in a GQA block (no up-projection)
    w_uv: jax.Array | None  # [h, c, v] W_UV = wkv_b[:, :, n:]; None in a GQA block
    experts: SplitExperts | None = None  # MoE blocks, ``split``: the routed experts split per expert


def absorbed(mla: MLA) -> tuple[jax.Array, jax.Array]:
    """(W_UK [h, n, c], W_UV [h, c, v]) in the compute dtype: the absorbed cache's up-projections."""
    n = mla.cfg.qk_nope_head_dim
    wkv_b = dense(mla.wkv_b[...], 2, jnp.dtype(mla.cfg.dtype))  # [c, h, n+v] (dequantised if kept FP8)
    return jnp.transpose(wkv_b[..., :n], (1, 2, 0)), jnp.transpose(wkv_b[..., n:], (1, 0, 2))


def decode_weights(model: Transformer, mtp: bool = False, split: bool = False) -> tuple:
    """``LayerWeights`` of every main-model block in order, then MTP module 1's block if ``mtp``.
    ``split``: also each MoE block's routed experts split per expert (``decode_experts.split_experts``)."""
    blocks = _blocks(model) + ([model.mtp[0].block] if mtp else [])
    return tuple(
        LayerWeights(
            *(absorbed(blk.attn) if isinstance(blk.attn, MLA) else (None, None)),
            split_experts(blk.mlp) if split and blk.is_moe else None,
        )
        for blk in blocks
    )


# ---- one layer ----


def _write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [b, S, ...] <- new [b, t, ...] at slots positions [b, t].

    One token per row (a decode step) is written as a select over the slots, not a scatter: at batch
    1 XLA:CPU turns the scatter into a dynamic-update-slice, fuses it into each reader of the
    updated cache and then copies the cache for each (4 copies per cache array and step, 32 per
    step for 4 layers); the select fuses into the readers as an elementwise pass, with no copy but
    the while loop's own (docs/benchmarks.md, "Generation"). Same values either way."""
    if positions.shape[1] == 1:
        hit = jnp.arange(cache.shape[1])[None, :] == positions  # [b, S]
        return jnp.where(hit.reshape(hit.shape + (1,) * (cache.ndim - 2)), new.astype(cache.dtype), cache)
    return _scatter(cache, new, positions)


def _scatter(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """``_write`` as a scatter (any t): the reference its one-token select is tested against."""
    return cache.at[jnp.arange(cache.shape[0])[:, None], positions].set(new.astype(cache.dtype))


def _slot_mask(positions: jax.Array, cache: dict) -> jax.Array:
    """[b, t, S]: a query at position p sees cache slots <= p (module docstring, "Batching")."""
    slots = jnp.arange(next(iter(cache.values())).shape[1])
    return slots[None, None, :] <= positions[:, :, None]


def gqa_cached_attention(attn: GQA, x: jax.Array, positions: jax.Array, cache: dict):
    """Grouped-query attention (``model/gqa.py``) over the per-KV-head cache k, v [b, S, j, k]:
    x [b, t, d] (normed), positions [b, t] -> (out [b, t, d], updated layer cache). Query head
    j p + i is (KV head j, member i) of the grouped query, as ``jnp.repeat`` pairs them in ``GQA``."""
    cfg, dt = attn.cfg, jnp.dtype(attn.cfg.dtype)
    j, p = cfg.kv_heads, cfg.n_heads // cfg.kv_heads
    q, k, v = attn.qkv(x, *attn.rope(positions))  # [b, t, h, k], [b, t, j, k], [b, t, j, k]
    cache = {"k": _write(cache["k"], k, positions), "v": _write(cache["v"], v, positions)}
    qg = q.reshape(q.shape[:2] + (j, p, q.shape[-1]))  # [b, t, j, p, k]
    scores = jnp.einsum("btjpk,bsjk->bjpts", qg, cache["k"], preferred_element_type=jnp.float32)  # [b, j, p, t, S]
    mask = _slot_mask(positions, cache)[:, None, None]  # [b, 1, 1, t, S]
    probs = jax.nn.softmax(jnp.where(mask, scores * cfg.softmax_scale, -1e30), axis=-1).astype(dt)
    o = jnp.einsum("bjpts,bsjk->btjpk", probs, cache["v"]).reshape(q.shape)  # [b, t, h, k]
    return linear("bthk,hkd->btd", o, attn.wo[...], dtype=dt, recipe=cfg.gemm_recipe), cache


def cached_attention(attn, x: jax.Array, positions: jax.Array, cache: dict, lw: LayerWeights | None = None):
    """x [b, t, d] (normed), positions [b, t] -> (out [b, t, d], updated layer cache). ``lw``: W_UK and
    W_UV prepared by ``decode_weights`` (None: ``absorbed(mla)`` here, same values). ``attn``: an MLA
    layer (below), or a GQA one (``gqa_cached_attention``; ``lw`` unused)."""
    if isinstance(attn, GQA):
        return gqa_cached_attention(attn, x, positions, cache)
    mla = attn
    cfg, dt = mla.cfg, jnp.dtype(mla.cfg.dtype)
    n = cfg.qk_nope_head_dim
    cos, sin = rope_angles(positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn)
    q_nope, q_rope = mla.queries(x, cos, sin)  # [b, t, h, n], [b, t, h, r]
    c_kv, k_rope = mla.latents(x, cos, sin)  # [b, t, c], [b, t, r]
    mask = _slot_mask(positions, cache)[:, None]  # [b, 1, t, S]
    if "c_kv" in cache:
        cache = {"c_kv": _write(cache["c_kv"], c_kv, positions), "k_rope": _write(cache["k_rope"], k_rope, positions)}
        ckv, kr = cache["c_kv"], cache["k_rope"]  # [b, S, c], [b, S, r]
        w_uk, w_uv = absorbed(mla) if lw is None else (lw.w_uk, lw.w_uv)  # [h, n, c], [h, c, v]
        q_lat = jnp.einsum("bthn,hnc->bthc", q_nope, w_uk)  # [b, t, h, c]
        scores = jnp.einsum("bthc,bsc->bhts", q_lat, ckv, preferred_element_type=jnp.float32) + jnp.einsum(
            "bthr,bsr->bhts", q_rope, kr, preferred_element_type=jnp.float32
        )
    else:
        kv = linear("btc,chk->bthk", c_kv, mla.wkv_b[...], dtype=dt, recipe=cfg.gemm_recipe)  # [b, t, h, n+v]
        k_new = jnp.concatenate([kv[..., :n], jnp.broadcast_to(k_rope[:, :, None], q_rope.shape)], -1)
        cache = {"k": _write(cache["k"], k_new, positions), "v": _write(cache["v"], kv[..., n:], positions)}
        k = cache["k"]  # [b, S, h, n+r]
        scores = jnp.einsum("bthn,bshn->bhts", q_nope, k[..., :n], preferred_element_type=jnp.float32) + jnp.einsum(
            "bthr,bshr->bhts", q_rope, k[..., n:], preferred_element_type=jnp.float32
        )
    probs = jax.nn.softmax(jnp.where(mask, scores * cfg.softmax_scale, -1e30), axis=-1).astype(dt)
    if "c_kv" in cache:
        # h before t in o_lat: with "bthc" XLA:CPU computed this product as its transpose and
        # copied the whole c_KV cache transposed in every decode step (docs/benchmarks.md, "Generation")
        o_lat = jnp.einsum("bhts,bsc->bhtc", probs, cache["c_kv"])  # [b, h, t, c]
        o = jnp.einsum("bhtc,hcv->bthv", o_lat, w_uv)  # [b, t, h, v]
    else:
        o = jnp.einsum("bhts,bshv->bthv", probs, cache["v"])  # [b, t, h, v]
    return linear("bthv,hvd->btd", o, mla.wo[...], dtype=dt, recipe=cfg.gemm_recipe), cache


def _blocks(model: Transformer) -> list:
    """The main model's blocks in order; a scanned (stacked) stack is sliced per layer."""

    def layers(stack, n: int) -> list:
        if isinstance(stack, nnx.List):
            return list(stack)
        graphdef, state = nnx.split(stack)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(n)]

    return layers(model.dense_blocks, model.cfg.first_k_dense) + layers(model.moe_blocks, model.cfg.n_moe_layers)


def block_cached(blk, x: jax.Array, positions: jax.Array, valid: jax.Array, cache: dict, small_batch: bool, lw=None):
    """One pre-norm block (``model/block.py``) with cached attention: x [b, t, d] -> (x, layer cache).

    ``small_batch``: MoE blocks use ``model/decode_experts.py`` (decode steps); else the layer itself.
    ``lw``: the block's ``LayerWeights`` (decode loops make them once; None: derived here).
    """
    a, cache = cached_attention(blk.attn, blk.attn_norm(x), positions, cache, lw)
    x = x + a.astype(x.dtype)
    h = blk.mlp_norm(x)
    if not blk.is_moe:
        y = blk.mlp(h)
    elif small_batch:
        y = small_batch_moe(blk.mlp, h, valid, experts=None if lw is None else lw.experts)
    else:
        y = blk.mlp(h, valid.astype(jnp.int32))[0]
    return x + y.astype(x.dtype), cache


def hidden_cached(model: Transformer, tokens, positions, valid, cache: tuple, small_batch: bool = False, weights=None):
    """tokens, positions, valid [b, t] -> (final-normed hidden [b, t, d], cache). Writes slots ``positions``.
    ``weights``: ``decode_weights(model)`` (its first n_layers entries are used), or None."""
    x = model.embed_tokens(tokens)
    new_cache = []
    weights = (None,) * model.cfg.n_layers if weights is None else weights
    for blk, layer_cache, lw in zip(_blocks(model), cache, weights):
        x, layer_cache = block_cached(blk, x, positions, valid, layer_cache, small_batch, lw)
        new_cache.append(layer_cache)
    return model.final_norm(x), tuple(new_cache)


def forward_cached(model: Transformer, tokens, positions, valid, cache: tuple, small_batch: bool = False, weights=None):
    """tokens, positions, valid [b, t] -> (logits [b, t, V] f32, cache). Writes slots ``positions``."""
    h, cache = hidden_cached(model, tokens, positions, valid, cache, small_batch, weights)
    return model.logits_from(h), cache


def mtp_cached(
    model: Transformer, h_prev, tokens_ahead, positions, valid, cache: dict, small_batch: bool = False, lw=None
):
    """MTP module 1 (``model/mtp.py``) with its own one-layer cache.

    h_prev [b, t, d]: the main model's final-normed hidden at ``positions``; tokens_ahead [b, t]: the
    token after each position. -> (normed hidden [b, t, d] whose logits predict the token two
    ahead, cache). ``lw``: its block's ``LayerWeights`` (``decode_weights(model, mtp=True)[-1]``) or None.
    """
    module = model.mtp[0]
    x = module.combine(h_prev, model.embed_tokens(tokens_ahead))  # [b, t, d]
    x, cache = block_cached(module.block, x, positions, valid, cache, small_batch, lw)
    return module.norm(x), cache


# ---- the reference loop: one jitted step per token, the host in between ----
# Kept as the reference for ``model/generation.py`` (the on-device loop) and
# ``model/speculative.py``: tests compare them token for token.


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, state, tokens, lengths, cache, key, sampling: Sampling | None = None):
    """Right-padded prompts tokens [b, T], lengths [b] -> (last-token logits [b, V], next ids [b], cache)."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < lengths[:, None]
    logits, cache = forward_cached(model, tokens, positions, valid, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [b, V]
    return last, sampling_lib.sample(last, key, sampling or sampling_lib.make(b)), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, state, tokens, positions, cache, key, sampling: Sampling | None = None):
    """One token per row: tokens, positions [b] -> (logits [b, V], next ids [b], cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = forward_cached(
        model, tokens[:, None], positions[:, None], jnp.ones_like(tokens[:, None], bool), cache
    )
    return logits[:, 0], sampling_lib.sample(logits[:, 0], key, sampling or sampling_lib.make(tokens.shape[0])), cache


def bucketed(lengths, max_new_tokens: int, bucket: int, extra: int = 0) -> tuple[int, int]:
    """(prompt length T, cache length S), each rounded up to a multiple of ``bucket`` so a new
    prompt length rarely recompiles. ``extra``: slots written past the last token (speculation)."""
    t = -(-int(max(lengths)) // bucket) * bucket
    return t, -(-(t + max_new_tokens + extra) // bucket) * bucket


def check_request(cfg: ModelConfig, prompts, max_new_tokens: int):
    """One-line errors for requests ``generate`` cannot serve."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    bad = [int(t) for p in prompts for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={cfg.vocab_size}), got {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt + max_new_tokens = {longest + max_new_tokens} exceeds model.max_seq_len={cfg.max_seq_len}"
        )


def right_padded(prompts, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [b, t] int32 right-padded with 0, lengths [b] int32)."""
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def generate_reference(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    cache: str = "absorbed",
    bucket: int = 16,
) -> list[list[int]]:
    """New tokens for each prompt (a stop token, when produced, ends its row and is included)."""
    check_request(model.cfg, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    t, total = bucketed([len(p) for p in prompts], max_new_tokens, bucket)
    tokens, lengths = right_padded(prompts, t)
    b = len(prompts)
    graphdef, state = nnx.split(model)
    sampling = sampling_lib.make(b, temperature, top_k, top_p)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    _, nxt, kv = prefill(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        init_cache(model.cfg, b, total, cache),
        sub,
        sampling=sampling,
    )
    out, done, pos, stops = [[] for _ in range(b)], np.zeros(b, bool), lengths.copy(), set(stop_tokens)
    for step in range(max_new_tokens):
        ids = np.asarray(nxt)
        for i in np.flatnonzero(~done):
            out[i].append(int(ids[i]))
            done[i] = ids[i] in stops
        if done.all() or step == max_new_tokens - 1:
            break
        key, sub = jax.random.split(key)
        _, nxt, kv = decode_step(graphdef, state, jnp.asarray(ids), jnp.asarray(pos), kv, sub, sampling=sampling)
        pos += 1
    return out
