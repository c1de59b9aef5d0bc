"""The on-device loop (model/generation.py) and MTP speculative decoding (model/speculative.py)
against the per-token reference loop (decode.generate_reference) and the full forward pass."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode, decode_experts, generation, sampling
from model.transformer import Transformer
from tests.model.test_decode import CFG
from tests.tolerances import assert_close

# A vocabulary of 8: the MTP module's random drafts are often right and often wrong, so both
# branches of the speculative step run (the tests check that they do).
SMALL_V = CFG.replace(vocab_size=8, n_layers=2)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _forward(model, ids):
    """The full forward pass (ModelOutput) of ids [b, t], jitted."""
    return _jit_forward(*nnx.split(model), jnp.asarray(ids, jnp.int32))


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def small_v():
    return Transformer(SMALL_V, rngs=nnx.Rngs(3))


# Ragged, several lengths (17 tokens: a second bucket). Every test uses 4 rows and 10 new tokens, so
# the compiled loops are shared between tests.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 101, 102], list(range(1, 18))]
SMALL_PROMPTS = [[p % 8 for p in q] for q in PROMPTS]
NEW = 10


def test_greedy_plain_and_speculative_equal_reference(model, small_v):
    ref = decode.generate_reference(model, PROMPTS, max_new_tokens=NEW)
    assert generation.generate(model, PROMPTS, max_new_tokens=NEW) == ref
    ref = decode.generate_reference(small_v, SMALL_PROMPTS, max_new_tokens=NEW)
    assert generation.generate(small_v, SMALL_PROMPTS, max_new_tokens=NEW) == ref
    r = generation.generate_details(small_v, SMALL_PROMPTS, max_new_tokens=NEW, speculative=True)
    print(f"accepted {r.accepted} of {r.drafted} drafts in {r.steps} steps")
    assert r.tokens == ref
    assert 0 < r.accepted < r.drafted  # both branches of the step ran


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (loops, branches, calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def test_prepared_split_experts_equal_reference(small_v):
    """``prepare_for`` (experts split per expert, one ``lax.switch`` per chosen expert in the step):
    greedy tokens equal the reference loop's, plain and speculative (1 row: 1 and 2 tokens per step,
    x top-2 < 8 experts); the loop really runs the switches; stale weights are refused."""
    one = SMALL_PROMPTS[3:]
    ref = decode.generate_reference(small_v, one, max_new_tokens=NEW)
    plain = generation.prepare_for(small_v, 1)
    assert plain.weights[0].experts is None and plain.weights[1].experts is not None  # dense, MoE block
    assert generation.generate(small_v, one, max_new_tokens=NEW, prepared=plain) == ref
    spec = generation.prepare_for(small_v, 1, speculative=True)
    assert spec.weights[-1].experts is not None  # the MTP block's experts too
    r = generation.generate_details(small_v, one, max_new_tokens=NEW, speculative=True, prepared=spec)
    assert r.tokens == ref

    graphdef, state = nnx.split(small_v)  # the loop as generate runs it, lowered from shapes only
    args = (jnp.ones((1, 32), jnp.int32), jnp.full((1,), 17), jnp.full((1,), NEW), generation.stop_array(()))
    args += (sampling.make(1), jax.random.key(0))
    loop = jax.eval_shape(functools.partial(generation.start, graphdef, total=48), state, *args)
    step = functools.partial(generation.advance, graphdef)
    jaxpr = jax.make_jaxpr(step)(state, loop, *args[2:5], 5, plain.weights).jaxpr
    switches = [e for e in _eqns(jaxpr) if e.primitive.name == "cond" and len(e.params["branches"]) == 8]
    assert len(switches) == SMALL_V.n_experts_per_tok  # one 8-expert switch per chosen expert

    with pytest.raises(ValueError, match="speculative=True, not False"):
        generation.generate(small_v, one, max_new_tokens=2, prepared=spec)
    other = Transformer(SMALL_V, rngs=nnx.Rngs(3))  # same values, other arrays
    with pytest.raises(ValueError, match="other parameters"):
        generation.generate(other, one, max_new_tokens=2, speculative=True, prepared=spec)
    spec = generation.prepare_for(other, 1, speculative=True)
    other.head.value = other.head[...] * 2  # an update in place (an optimizer step)
    with pytest.raises(ValueError, match="other parameters"):
        generation.generate(other, one, max_new_tokens=2, speculative=True, prepared=spec)


def test_stop_tokens_and_budgets(small_v):
    greedy = decode.generate_reference(small_v, SMALL_PROMPTS, max_new_tokens=NEW)
    stop = greedy[2][3]
    ref = decode.generate_reference(small_v, SMALL_PROMPTS, max_new_tokens=NEW, stop_tokens=(stop, 7))
    assert ref[2] == greedy[2][: greedy[2].index(stop) + 1]
    assert any(len(r) < NEW for r in ref) and any(len(r) == NEW for r in ref)
    for speculative in (False, True):
        kw = dict(max_new_tokens=NEW, speculative=speculative)
        assert generation.generate(small_v, SMALL_PROMPTS, stop_tokens=(stop, 7), **kw) == ref
        # per-row budgets: prefixes of the greedy rows (a bonus token never overshoots a budget)
        kw["max_new_tokens"] = [0, 1, 5, NEW]
        assert generation.generate(small_v, SMALL_PROMPTS, **kw) == [[], greedy[1][:1], greedy[2][:5], greedy[3]]


def test_bad_requests_one_line_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        generation.generate(model, [[1, 2]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        decode.generate_reference(model, [[1, 2]], max_new_tokens=-3)
    with pytest.raises(ValueError, match="top_p out of range"):
        generation.generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"vocab_size=264"):
        generation.generate(model, [[1, 264]], max_new_tokens=2)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        generation.generate(
            Transformer(CFG.replace(mtp_depth=0, n_layers=1), rngs=nnx.Rngs(0)),
            [[1]],
            max_new_tokens=2,
            speculative=True,
        )


def test_sampling_per_row_settings_logprobs_and_streaming(model):
    greedy = generation.generate(model, PROMPTS, max_new_tokens=NEW)
    # row 0 greedy, row 1 top-k 1 (= greedy), rows 2 and 3 sampled
    kw = dict(max_new_tokens=NEW, temperature=[0.0, 1.0, 1.0, 0.7], top_k=[0, 1, 0, 50], top_p=[1, 1, 1, 0.9], seed=5)
    r = generation.generate_details(model, PROMPTS, **kw)
    assert r.tokens[:2] == greedy[:2] and r.tokens[2] != greedy[2]
    assert generation.generate(model, PROMPTS, **kw) == r.tokens  # same seed, same tokens
    # log-probs: log softmax of the full forward's logits at each generated token (top-k 1 row: 0)
    for i, p in enumerate(PROMPTS[:3]):
        seq = p + r.tokens[i] + [0] * (32 - len(p) - NEW)  # one shape: causal, padding changes nothing before it
        logits = np.asarray(_forward(model, [seq]).logits)[0, len(p) - 1 : len(p) - 1 + NEW]
        want = np.zeros(NEW) if i == 1 else np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(NEW), r.tokens[i]]
        assert_close(np.asarray(r.logprobs[i]), want, composite=True)
    seen = []
    streamed = generation.generate(model, PROMPTS, stream_every=4, on_tokens=seen.append, **kw)
    assert streamed == r.tokens
    assert [len(s[0]) for s in seen] == [5, 9, 10]  # first token from the prefill, then 4 per call


def _joint_counts(toks: np.ndarray, v: int) -> np.ndarray:
    return np.bincount(toks[:, 0] * v * v + toks[:, 1] * v + toks[:, 2], minlength=v**3)


def _exact_joint(model, prompt, v: int) -> np.ndarray:
    """P(t1, t2, t3 | prompt) from full forward passes over every 2-token continuation."""
    pairs = np.array([[a, b] for a in range(v) for b in range(v)])
    seqs = np.concatenate([np.tile(prompt, (v * v, 1)), pairs], 1)
    logp = np.asarray(jax.nn.log_softmax(_forward(model, seqs).logits, -1), np.float64)  # [v^2, L+2, v]
    n = len(prompt)
    p1 = np.exp(logp[0, n - 1])  # [v]
    p2 = np.exp(logp[::v, n])  # [v, v]: rows a*v
    p3 = np.exp(logp[:, n + 1]).reshape(v, v, v)
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at standard-normal z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("speculative", [False, True])
def test_sampling_matches_the_exact_distribution(small_v, speculative):
    """Temperature 1: the joint of the first three new tokens, over 6,000 rows, against the exact
    joint from the full forward pass (chi-square goodness of fit, cells with expectation < 5 pooled)."""
    v, n, prompt = SMALL_V.vocab_size, 6000, [3, 1, 4]
    r = generation.generate_details(
        small_v, [prompt] * n, max_new_tokens=3, temperature=1.0, seed=11, speculative=speculative
    )
    counts = _joint_counts(np.asarray(r.tokens), v)
    expected = _exact_joint(small_v, prompt, v) * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    print(
        f"speculative={speculative}: chi2 {chi2:.1f}, df {df}, critical {_chi2_critical(df):.1f}; "
        f"accepted {r.accepted} of {r.drafted}"
    )
    assert chi2 < _chi2_critical(df)
    if speculative:
        assert 0.2 < r.accepted / r.drafted < 0.95  # both the accept and the resample branch matter


def test_mtp_cache_matches_full_forward(small_v):
    """MTP module logits from the cached path (prefill) = the full forward's mtp_logits."""
    ids = np.random.RandomState(0).randint(0, 8, (2, 9)).astype(np.int32)
    out = _forward(small_v, ids)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool)

    @jax.jit
    def cached(state, ids, ahead):
        m = nnx.merge(nnx.graphdef(small_v), state)
        h, _ = decode.hidden_cached(m, ids, pos, valid, decode.init_cache(SMALL_V, b, 16, "absorbed"))
        hm, _ = decode.mtp_cached(m, h, ahead, pos, valid, decode.init_layer_cache(SMALL_V, b, 16, "absorbed"))
        return h, m.logits_from(hm)

    ahead = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], 1)
    h, mtp_logits = cached(nnx.state(small_v), ids, ahead)
    assert_close(np.asarray(h), np.asarray(out.hidden))
    assert_close(np.asarray(mtp_logits), np.asarray(out.mtp_logits[0]))


# 2 and 16 tokens: the gather and the dense layout; the gather's tokens also with the experts split
# per expert (routed_switch; split inside the trace, so the gradients reach the stacked weights)
@pytest.mark.parametrize("m,split", [(1, False), (1, True), (8, False)])
def test_small_batch_experts_match_the_layer(model, m, split):
    graphdef, state = nnx.split(model.moe_blocks[0].mlp)
    x = jax.random.normal(jax.random.key(m), (m, 2, CFG.d_model))
    valid = jnp.ones((m, 2), bool)

    def fast(state, x):  # the weights as an argument: the layer is built inside each trace
        layer = nnx.merge(graphdef, state)
        experts = decode_experts.split_experts(layer) if split else None
        return decode_experts.small_batch_moe(layer, x, valid, experts=experts)

    def ref(state, x):
        return nnx.merge(graphdef, state)(x, valid.astype(jnp.int32))[0]

    assert_close(np.asarray(jax.jit(fast)(state, x)), np.asarray(jax.jit(ref)(state, x)))
    # gradients with respect to the input and every weight (differentiating the weights also rebuilds
    # their variables inside the trace, where the router may write its load statistics)
    grads = [
        jax.jit(jax.grad(lambda st, x, fn=fn: jnp.sum(jnp.sin(fn(st, x))), argnums=(0, 1)))(state, x)
        for fn in (fast, ref)
    ]
    flat = [jax.tree.leaves(g) for g in grads]
    assert len(flat[0]) == len(flat[1]) > 4
    for a, b in zip(*flat):
        assert_close(np.asarray(a), np.asarray(b), composite=True)


def test_argmax_matches_jnp_argmax():
    """sampling.argmax (a max and a min, faster on XLA:CPU) = jnp.argmax: first of tied maxima,
    the first NaN when there is one, infinities."""
    x = np.random.RandomState(0).randint(-3, 3, (64, 16)).astype(np.float32)  # many ties
    x[1, :] = 5.0
    x[2, [3, 9]] = np.nan
    x[3, 7], x[4, :] = np.inf, -np.inf
    x[5, [2, 6]] = np.inf
    for a in (x, x[0], x.reshape(8, 8, 16)):
        got = np.asarray(jax.jit(sampling.argmax)(jnp.asarray(a)))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(a), -1)))
