"""Cached decoding (model/decode.py) against the full forward pass; the reference generation loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode, presets, sampling
from model.config import YarnConfig
from model.transformer import Transformer
from tests.tolerances import assert_close
from tests.util import tiny_config

CFG = tiny_config(
    vocab_size=264,
    d_model=64,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    dense_ffn_dim=96,
    moe_ffn_dim=32,
    n_group=2,
    topk_group=1,
    moe_block_rows=64,
    yarn=YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=0.9, mscale_all_dim=0.8),
)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(1))


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def _forward(model, ids, pad_to=16):
    """Full-forward logits [b, t, V] of ids [b, t]; right-padded to one shape (one compile): causal
    attention and per-token routing leave the logits of earlier positions unchanged."""
    ids = np.asarray(ids, np.int32)
    padded = np.zeros((ids.shape[0], pad_to), np.int32)
    padded[:, : ids.shape[1]] = ids
    return np.asarray(_jit_forward(*nnx.split(model), jnp.asarray(padded)))[:, : ids.shape[1]]


def _teacher_forced(model, ids, kind):
    """Logits [b, t, V] from a 1-token prefill, then one decode step per token of ``ids``."""
    b, t = ids.shape
    graphdef, state = nnx.split(model)
    cache = decode.init_cache(model.cfg, b, t, kind)
    key = jax.random.key(0)
    logits, _, cache = decode.prefill(graphdef, state, jnp.asarray(ids[:, :1]), jnp.ones((b,), jnp.int32), cache, key)
    out = [logits]
    for j in range(1, t):
        logits, _, cache = decode.decode_step(
            graphdef, state, jnp.asarray(ids[:, j]), jnp.full((b,), j, jnp.int32), cache, key
        )
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], 1)


@pytest.mark.parametrize("kind", decode.KINDS)
def test_token_by_token_equals_full_forward(model, kind):
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    full = _forward(model, ids)
    got = _teacher_forced(model, ids, kind)
    print(f"{kind}: max |decode - forward| = {np.abs(got - full).max():.3g}")
    assert_close(got, full)  # f32: 1e-5


def test_ragged_batch_matches_single_prompts(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 101, 102]]
    graphdef, state = nnx.split(model)
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((3, 16), np.int32)  # the shapes generate() buckets to: one compile for both
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    last, _, _ = decode.prefill(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        decode.init_cache(CFG, 3, 32, "absorbed"),
        jax.random.key(0),
        sampling.make(3),
    )
    for i, p in enumerate(prompts):  # the prefill's last-token logits are the unpadded forward's
        full = _forward(model, [p])[0, -1]
        assert_close(np.asarray(last)[i], full)
    batch = decode.generate_reference(model, prompts, max_new_tokens=6)
    single = [decode.generate_reference(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert batch == single
    # greedy continuation = argmax of the full forward over prompt + generated tokens
    seq = prompts[0] + batch[0]
    full = _forward(model, [seq])[0]
    assert [int(x) for x in full[len(prompts[0]) - 1 : -1].argmax(-1)] == batch[0]


def test_sampling_controls(model):
    prompts = [[1, 2, 3], [9, 8]]
    gen = functools.partial(decode.generate_reference, model, prompts, max_new_tokens=5)
    greedy = gen()
    assert gen(temperature=1.0, top_k=1) == greedy
    assert gen(temperature=1.0, top_p=1e-6) == greedy
    a = gen(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == gen(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    stop = greedy[0][2]
    got = gen(stop_tokens=(stop,))
    assert got[0] == greedy[0][: greedy[0].index(stop) + 1]


def _draws(logits, temperature, top_k, top_p):
    s = sampling.make(logits.shape[0], temperature, top_k, top_p)
    return set(np.asarray(sampling.sample(logits, jax.random.key(0), s)).tolist())


def test_sample_top_k_top_p_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    assert _draws(logits, 1.0, 2, 1.0) == {0, 1}
    assert _draws(logits, 1.0, 0, 0.75) == {0, 1}  # 0.5 + 0.3 >= 0.75: two tokens
    assert _draws(logits, 1.0, 0, 0.85) == {0, 1, 2}
    assert _draws(logits, 1.0, 3, 0.99) == {0, 1, 2}  # top-p over what top-k kept
    assert _draws(logits, 1.0, 0, 1.0) == {0, 1, 2, 3}
    assert _draws(logits, 0.0, 0, 1.0) == {0}


def test_cache_bytes_per_token():
    """(kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes; MTP modules are not cached."""
    b, s = 2, 10
    for kind in decode.KINDS:
        cache = decode.init_cache(CFG, b, s, kind)
        allocated = sum(x.nbytes for layer in cache for x in layer.values())
        assert allocated == decode.cache_bytes_per_token(CFG, kind) * b * s
    assert decode.cache_bytes_per_token(CFG, "absorbed") == (24 + 8) * 3 * 4
    v3 = presets.deepseek_v3_671b()
    assert decode.cache_bytes_per_token(v3, "absorbed") == (512 + 64) * 61 * 2  # 70,272 B
    assert decode.cache_bytes_per_token(v3, "naive") == 128 * (192 + 128) * 61 * 2


def test_scanned_layers_decode_equally():
    cfg = CFG.replace(scan_layers=True, n_layers=2)
    m = Transformer(cfg, rngs=nnx.Rngs(2))
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 6)).astype(np.int32)
    assert_close(_teacher_forced(m, ids, "absorbed"), _forward(m, ids, pad_to=6))


@pytest.mark.parametrize("trailing", [(5,), (3, 4)])  # the absorbed cache [b, S, c]; the naive one [b, S, h, k]
def test_one_token_write_equals_scatter(trailing):
    """A decode step's cache write (``decode._write`` with t = 1: a select over the slots) against the
    scatter it replaces: bitwise the same cache, rows at different slots (first, middle, last).
    Catches a select on the wrong axis, a slot off by one, a row written at another row's slot."""
    b, s = 3, 7
    cache = jax.random.normal(jax.random.key(0), (b, s) + trailing)
    new = jax.random.normal(jax.random.key(1), (b, 1) + trailing)
    positions = jnp.array([[0], [3], [s - 1]], jnp.int32)
    got = decode._write(cache, new, positions)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(decode._scatter(cache, new, positions)))
    assert not np.array_equal(np.asarray(got), np.asarray(cache))  # it did write
