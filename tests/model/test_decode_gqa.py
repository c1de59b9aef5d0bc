"""The per-KV-head cache of grouped-query attention models (model/decode.py): cached decoding equals
the full forward token by token; the compiled generation loop equals the reference loop."""

import functools

import numpy as np
import pytest
from flax import nnx

from model import decode, generation, presets
from model.config import Llama3RopeConfig
from model.transformer import Transformer
from tests.model.test_decode import _forward, _teacher_forced
from tests.model.test_gqa import _randomise
from tests.tolerances import assert_close
from tests.util import tiny_config

GQA = dict(attention_type="gqa", d_model=32, n_heads=4, head_dim=8, first_k_dense=2, n_layers=2, vocab_size=96)
CONFIGS = {
    "gqa2_bias_llama3": dict(
        n_kv_heads=2, qkv_bias=True, llama3_rope=Llama3RopeConfig(original_max_position_embeddings=4)
    ),
    # multi-query, q/k norms, tied head, and a MoE block after the GQA one (the Qwen-MoE layout)
    "mqa_qknorm_tied_moe": dict(n_kv_heads=1, qk_norm=True, tie_word_embeddings=True, first_k_dense=1),
}


@functools.cache
def _model(name):
    cfg = tiny_config(**{**GQA, "mtp_depth": 0, **CONFIGS[name]})
    return _randomise(Transformer(cfg, rngs=nnx.Rngs(0)), 3)  # random biases and norm scales too


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _model(request.param)


def test_token_by_token_equals_full_forward(model):
    ids = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, 10)).astype(np.int32)
    full = _forward(model, ids)
    got = _teacher_forced(model, ids, "absorbed")  # the kind names MLA's two caches; GQA has one
    print(f"max |decode - forward| = {np.abs(got - full).max():.3g}")
    assert_close(got, full, composite=True)


def test_generation_loop_is_the_greedy_continuation():
    """The compiled loop (``model/generation.py``, the RL trainer's) on the GQA cache: its greedy
    tokens are the argmax of the full forward over prompt + generated tokens, for every row."""
    model = _model("mqa_qknorm_tied_moe")
    prompts = [[5, 6, 7, 8], [42], [10, 11, 12]]
    got = generation.generate(model, prompts, max_new_tokens=5)
    for p, new in zip(prompts, got):
        full = _forward(model, [p + new])[0]
        assert [int(x) for x in full[len(p) - 1 : -1].argmax(-1)] == new


def test_cache_bytes_per_token():
    cfg = tiny_config(**GQA, n_kv_heads=2)
    cache = decode.init_cache(cfg, 2, 7, "naive")
    assert {k: v.shape for k, v in cache[0].items()} == {"k": (2, 7, 2, 8), "v": (2, 7, 2, 8)}
    assert decode.cache_bytes_per_token(cfg, "absorbed") == 2 * 2 * 8 * 2 * 4  # k and v, j k, 2 layers, f32
    llama = presets.llama3_1_8b()
    assert decode.cache_bytes_per_token(llama, "absorbed") == 2 * 8 * 128 * 32 * 2  # 128 KiB in bf16
