"""Generation as one compiled loop on the device: prefill, then ``lax.while_loop`` over decode steps.

Sampling, stop tokens, per-row token budgets and finished flags all live inside the loop; the host
sees the result once (or every ``stream_every`` steps, for a CLI that prints as it goes: the loop
state stays on the device between the calls). Two step functions share the driver:

* plain: one token per row per step (``PlainState``, below);
* speculative: the MTP module drafts one token and the main model verifies it in the next step's
  forward (``model/speculative.py``; DeepSeek-V3 report Sec. 5.4.3), 1 or 2 tokens per row per step.

Shapes are bucketed (``decode.bucketed``): prompts to a multiple of ``bucket`` tokens and the cache
to a multiple beyond prompt + max_new_tokens; the budget, stop tokens and sampling settings are
traced values, so a new request rarely recompiles.

Function API (also for the RL trainer, inside its own jit if it likes): ``start`` then ``advance``
on right-padded ``tokens [b, T]`` and ``lengths [b]`` -> ``Loop.out``: the new tokens [b, N], their
log-probabilities (``model/sampling.py``: ``logprob``), per-row counts and draft statistics.
``generate`` / ``generate_details`` are the host conveniences over lists of token ids.
``decode.generate_reference`` is the per-token host loop this replaces, kept as the reference.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import decode
from model import sampling as sampling_lib
from model import speculative as spec
from model.sampling import Sampling
from model.transformer import Transformer

_STOP_SLOTS = 8  # stop-token array length (padded with -1): one shape for up to 8 stop tokens


class Out(NamedTuple):
    tokens: jax.Array  # [b, N] int32: row i's j-th new token at [i, j]; 0 past n_new
    logprobs: jax.Array  # [b, N] f32 of those tokens (model/sampling.py: logprob)
    n_new: jax.Array  # [b] int32 tokens produced
    done: jax.Array  # [b] bool: produced a stop token or its budget
    drafted: jax.Array  # [b] int32 draft tokens verified (speculative; 0 otherwise)
    accepted: jax.Array  # [b] int32 of those, accepted


class Loop(NamedTuple):
    step: jax.Array  # () int32 decode steps run so far
    key: jax.Array
    out: Out
    core: Any  # the step function's own state (PlainState or speculative.SpecState)


class PlainState(NamedTuple):
    cache: tuple
    tok: jax.Array  # [b] the newest token, not yet in the cache
    pos: jax.Array  # [b] its position


def emit(out: Out, new: jax.Array, lps: jax.Array, avail: jax.Array, stops: jax.Array, budget: jax.Array) -> Out:
    """Append up to ``avail`` [b] of ``new`` / ``lps`` [b, w] to each unfinished row, in order; a stop
    token or the row's budget [b] finishes it (the stop token is kept)."""
    rows, n_max = jnp.arange(new.shape[0]), out.tokens.shape[1]
    for j in range(new.shape[1]):
        ok = ~out.done & (j < avail)  # [b]
        at = jnp.where(ok, out.n_new, n_max)  # n_max: out of bounds, dropped
        n_new = out.n_new + ok
        stop = jnp.any(new[:, j, None] == stops[None], -1)
        out = out._replace(
            tokens=out.tokens.at[rows, at].set(new[:, j], mode="drop"),
            logprobs=out.logprobs.at[rows, at].set(lps[:, j], mode="drop"),
            n_new=n_new,
            done=out.done | (ok & stop) | (n_new >= budget),
        )
    return out


# ---- plain decoding: one token per row per step ----


def _last_logits(model: Transformer, h: jax.Array, lengths: jax.Array) -> jax.Array:
    """Head on each row's last prompt position only: h [b, T, d] -> [b, V] (never [b, T, V])."""
    return model.logits_from(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1))[:, 0]


def plain_start(model, tokens, lengths, sampling: Sampling, key, total: int, kind: str):
    """Prefill -> (PlainState, first tokens [b], their log-probs [b])."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, cache = decode.hidden_cached(
        model, tokens, positions, positions < lengths[:, None], decode.init_cache(model.cfg, b, total, kind)
    )
    last = _last_logits(model, h, lengths)
    first = sampling_lib.sample(last, key, sampling)
    return PlainState(cache, first, lengths), first, sampling_lib.logprob(last, first, sampling)


def plain_step(model, st: PlainState, done, sampling: Sampling, key, weights=None):
    """One token per row -> (state, new [b, 1], log-probs [b, 1], available [b], drafted, accepted).
    ``weights``: ``decode.decode_weights(model)``, made once before the loop (None: per step)."""
    b = st.tok.shape[0]
    logits, cache = decode.forward_cached(
        model, st.tok[:, None], st.pos[:, None], jnp.ones((b, 1), bool), st.cache, small_batch=True, weights=weights
    )
    nxt = sampling_lib.sample(logits[:, 0], key, sampling)
    lp = sampling_lib.logprob(logits[:, 0], nxt, sampling)
    zeros = jnp.zeros((b,), jnp.int32)
    return (
        PlainState(cache, nxt, jnp.where(done, st.pos, st.pos + 1)),
        nxt[:, None],
        lp[:, None],
        zeros + 1,
        zeros,
        zeros,
    )


_METHODS = {False: (plain_start, plain_step), True: (spec.start, spec.step)}


# ---- the compiled driver ----


@functools.partial(jax.jit, static_argnames=("graphdef", "total", "kind", "speculative"))
def start(
    graphdef,
    state,
    tokens,
    lengths,
    budget,
    stops,
    sampling: Sampling,
    key,
    *,
    total: int,
    kind: str = "absorbed",
    speculative: bool = False,
) -> Loop:
    """Prefill right-padded tokens [b, T] (lengths [b]) into a ``total``-slot cache; the first token
    of each row is produced here. budget [b]: max new tokens per row; stops [n]: stop ids (-1 = none)."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    key, sub = jax.random.split(key)
    core, first, lp = _METHODS[speculative][0](model, tokens, lengths, sampling, sub, total, kind)
    n = total - t
    zeros = jnp.zeros((b,), jnp.int32)
    out = Out(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), zeros, budget <= 0, zeros, zeros)
    out = emit(out, first[:, None], lp[:, None], zeros + 1, stops, budget)
    return Loop(jnp.zeros((), jnp.int32), key, out, core)


@functools.partial(jax.jit, static_argnames=("graphdef", "speculative", "split"))
def prepare(graphdef, state, *, speculative: bool = False, split: bool = False) -> tuple:
    """``decode.decode_weights`` as one call: W_UK / W_UV per layer and, with ``split``, the routed
    experts split per expert (a copy of every expert matrix: make it once per set of weights)."""
    return decode.decode_weights(nnx.merge(graphdef, state), mtp=speculative, split=split)


@functools.partial(jax.jit, static_argnames=("graphdef", "speculative"), donate_argnames=("loop",))
def advance(
    graphdef, state, loop: Loop, budget, stops, sampling: Sampling, until, weights=None, *, speculative: bool = False
) -> Loop:
    """Decode steps until every row is done or ``until`` steps have run in all (a traced scalar).

    The steps read W_UK / W_UV in ``decode.decode_weights``' layout: ``weights`` from ``prepare``,
    or (None) made here once per call, before the loop (2 small transposes per layer, instead of in
    every step)."""
    step_fn = _METHODS[speculative][1]
    if weights is None:
        weights = decode.decode_weights(nnx.merge(graphdef, state), mtp=speculative)

    def cond(carry):
        lp = carry[0]
        return (lp.step < until) & ~jnp.all(lp.out.done)

    def body(carry):
        # The weights ride in the carry (unchanged) so the model is built at the loop body's trace
        # level: nnx refuses layers that write a variable (the router's load) from another one.
        lp, params, weights = carry
        model = nnx.merge(graphdef, params)
        key, sub = jax.random.split(lp.key)
        active = (~lp.out.done).astype(jnp.int32)
        core, new, lps, avail, drafted, accepted = step_fn(model, lp.core, lp.out.done, sampling, sub, weights)
        out = emit(lp.out, new, lps, avail, stops, budget)
        out = out._replace(drafted=out.drafted + active * drafted, accepted=out.accepted + active * accepted)
        return Loop(lp.step + 1, key, out, core), params, weights

    return jax.lax.while_loop(cond, body, (loop, state, weights))[0]


# ---- host conveniences ----


class Prepared(NamedTuple):
    """Decode-layout weights for ``generate_details(prepared=...)``, made once by ``prepare_for``
    and reused while the model's parameters stay the same arrays (checked at every use)."""

    weights: tuple  # ``prepare``'s output
    params: list  # the parameter arrays they were made from
    speculative: bool


def small_step(cfg, batch: int, speculative: bool) -> bool:
    """Whether a decode step's tokens (``batch`` rows, 2 per row when speculative) use the
    gathered experts (``decode_experts``: m k < E, "bf16" only), the path the split experts speed up."""
    return (
        cfg.gemm_recipe == "bf16" and batch * (2 if speculative else 1) * cfg.n_experts_per_tok < cfg.n_routed_experts
    )


def prepare_for(model: Transformer, batch: int, speculative: bool = False) -> Prepared:
    """Weights for repeated ``generate_details`` calls of ``batch`` rows on this model: W_UK / W_UV
    per layer and, when a step gathers experts (``small_step``), the routed experts split per expert
    (``decode_experts.routed_switch``: the step's dots read them in place instead of copying the
    chosen matrices every step; docs/benchmarks.md, "Generation"). Costs a copy of every expert
    matrix, once: worth it for a model that serves many requests, not for one call."""
    graphdef, state = nnx.split(model)
    split = model.cfg.n_moe_layers > 0 and small_step(model.cfg, batch, speculative)
    weights = prepare(graphdef, state, speculative=speculative, split=split)
    return Prepared(weights, jax.tree.leaves(state), speculative)


def _prepared_weights(prepared: Prepared | None, state, speculative: bool):
    if prepared is None:
        return None
    if prepared.speculative != speculative:
        raise ValueError(f"prepared weights were made for speculative={prepared.speculative}, not {speculative}")
    leaves = jax.tree.leaves(state)
    if len(leaves) != len(prepared.params) or any(a is not b for a, b in zip(leaves, prepared.params)):
        raise ValueError("prepared weights were made from other parameters: call prepare_for(model, ...) again")
    return prepared.weights


class Result(NamedTuple):
    tokens: list  # per row: the new token ids (a stop token, when produced, ends the row and is kept)
    logprobs: list  # per row: their log-probabilities
    drafted: int  # speculative: drafts verified, over all rows
    accepted: int  # ... of which accepted
    steps: int  # decode steps run (after the prefill)
    ttft_s: float  # wall time to the first token of every row (prefill; includes any compilation)
    seconds: float  # wall time in all


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    if len(stop_tokens) > _STOP_SLOTS:
        raise ValueError(f"at most {_STOP_SLOTS} stop tokens, got {len(stop_tokens)}")
    return jnp.asarray(list(stop_tokens) + [-1] * (_STOP_SLOTS - len(stop_tokens)), jnp.int32)


def generate_details(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    cache: str = "absorbed",
    bucket: int = 16,
    speculative: bool = False,
    stream_every: int = 0,
    on_tokens: Callable[[list], None] | None = None,
    rows: jax.sharding.Sharding | None = None,
    prepared: Prepared | None = None,
) -> Result:
    """Generate for every prompt in one batch. ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``: one value or one per prompt. ``stream_every`` > 0 with ``on_tokens``: the loop
    returns to the host every that many steps and ``on_tokens(tokens so far, per row)`` is called.
    ``rows``: where the per-row inputs go (e.g. a training mesh's batch sharding, for a model whose
    params live on that mesh: the rows, and so the cache, are split over its devices); the
    prompt count must divide over it. None: the default device. ``prepared``: ``prepare_for(model,
    len(prompts), speculative)``, for many calls on the same weights (None: made per call, without
    the split experts)."""
    t0 = time.perf_counter()
    b = len(prompts)
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (b,)) if b else np.zeros(0, int)
    if budgets.dtype.kind not in "iu" or (budgets < 0).any():
        raise ValueError(f"max_new_tokens must be ints >= 0, got {np.asarray(max_new_tokens).tolist()}")
    most = int(budgets.max()) if b else 0
    decode.check_request(model.cfg, prompts, most)
    if speculative and model.cfg.mtp_depth < 1:
        raise ValueError("speculative decoding drafts with the MTP module: the model has mtp_depth=0")
    put = jnp.asarray if rows is None else (lambda x: jax.device_put(x, rows))
    sampling = jax.tree.map(put, sampling_lib.make(b, temperature, top_k, top_p))
    t, total = decode.bucketed([len(p) for p in prompts], most, bucket, extra=1)
    tokens, lengths = decode.right_padded(prompts, t)
    graphdef, state = nnx.split(model)
    budget, stops = put(np.asarray(budgets, np.int32)), stop_array(stop_tokens)
    weights = _prepared_weights(prepared, state, speculative)
    loop = start(
        graphdef,
        state,
        put(tokens),
        put(lengths),
        budget,
        stops,
        sampling,
        jax.random.key(seed),
        total=total,
        kind=cache,
        speculative=speculative,
    )
    loop.out.n_new.block_until_ready()
    ttft = time.perf_counter() - t0
    chunk = stream_every if (stream_every > 0 and on_tokens is not None) else most
    while True:
        loop = advance(
            graphdef, state, loop, budget, stops, sampling, loop.step + max(chunk, 1), weights, speculative=speculative
        )
        finished = bool(jnp.all(loop.out.done))
        if chunk < most:
            on_tokens(_rows(loop.out.tokens, loop.out.n_new))
        if finished or chunk >= most:
            break
    out = jax.device_get(loop.out)
    return Result(
        _rows(out.tokens, out.n_new),
        _rows(out.logprobs, out.n_new, float),
        int(out.drafted.sum()),
        int(out.accepted.sum()),
        int(loop.step),
        ttft,
        time.perf_counter() - t0,
    )


def _rows(a, n, cast=int) -> list:
    a, n = np.asarray(a), np.asarray(n)
    return [[cast(x) for x in a[i, : n[i]]] for i in range(a.shape[0])]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], **kw) -> list[list[int]]:
    """New tokens for each prompt; arguments as ``generate_details``."""
    return generate_details(model, prompts, **kw).tokens
