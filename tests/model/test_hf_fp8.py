"""``model.hf.from_pretrained(keep_fp8=True)``: DeepSeek's FP8 checkpoint (e4m3 + 128x128
``weight_scale_inv``) kept as stored, run through the FP8 matmul; against the dequantise-at-import
path. The test writes its own tiny FP8 checkpoint (no torch needed)."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kernels_pallas.fp8 import grouped_prequantized_matmul
from model import fp8_weights, hf
from model.config import ModelConfig
from model.generation import generate_details, prepare_for
from model.grouped_matmul import gmm
from model.linear import QuantizedWeight, dequantize, linear
from model.moe_ep import ExpertParallel
from model.transformer import Transformer
from tests.tolerances import assert_close

# Every linear dim a multiple of 128 except wkv_a's output (c + r = 192: 1.5 blocks, as V3's 576 is
# 4.5); the block grids are not square (wq_b: K 128 x N 256) so a transposed scale cannot pass.
CFG = ModelConfig(
    d_model=128,
    n_layers=2,
    first_k_dense=1,
    dense_ffn_dim=256,
    n_heads=2,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=4,
    n_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    moe_ffn_dim=128,
    mtp_depth=1,
)
INV = np.float32(1 / 448)


def _scale(amax: float) -> np.float32:
    """DeepSeek's per-block scale amax / 448, moved by the fewest ulps to one the recipe's quantizer
    gives back from the dequantised block (its amax is 448 s; its scale amax * f32(1/448)). About
    half of all f32 scales already are; with the others the re-quantised scale would be 1 ulp off
    and the two paths below would differ by that rounding instead of being the same product."""
    s = np.float32(amax) * INV
    lo = hi = s
    for _ in range(64):
        for c in (lo, hi):
            if np.float32(np.float32(448) * c) * INV == c:
                return c
        lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(np.inf))
    raise AssertionError(f"no round-trip scale near {s}")


def _quantize(w: np.ndarray):
    """w [o, i] f32 -> (e4m3 [o, i], scale_inv [ceil(o/128), ceil(i/128)]) as DeepSeek's release stores it."""
    o, i = w.shape
    scale = np.empty(fp8_weights.block_shape(o, i), np.float32)
    for a in range(scale.shape[0]):
        for b in range(scale.shape[1]):
            scale[a, b] = _scale(np.abs(w[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128]).max())
    full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:o, :i]
    q = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    for a in range(scale.shape[0]):  # every block's largest value is +-448: its scale is exact
        for b in range(scale.shape[1]):
            assert np.abs(q[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128].astype(np.float32)).max() == 448
    return q, scale


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_fp8"))
    hf.save_pretrained(Transformer(CFG, rngs=nnx.Rngs(0)), path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for k in list(tensors):
        if tensors[k].ndim != 2 or "embed" in k or "head" in k or k.endswith("mlp.gate.weight"):
            continue  # DeepSeek keeps these in high precision
        tensors[k], tensors[k + "_scale_inv"] = _quantize(tensors[k])
    save_file(tensors, os.path.join(path, "model.safetensors"))
    conf = json.load(open(os.path.join(path, "config.json")))
    conf["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128])
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    return path


@pytest.fixture(scope="module")
def models(fp8_dir):
    kept = hf.from_pretrained(fp8_dir, dtype="float32", keep_fp8=True)
    deq = hf.from_pretrained(fp8_dir, dtype="float32")  # today's path: dequantised at import
    return kept, deq


def _with_recipe(model, recipe: str):
    """The same weights under another ``gemm_recipe`` (a static field of the module tree)."""
    cfg = dataclasses.replace(model.cfg, gemm_recipe=recipe)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@nnx.jit
def _logits(model, ids):
    return model(ids).logits


def _kept(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, fp8_weights.FP8Param))}


ROUTED = ("w_gate", "w_up", "w_down")  # the MoE layers' stacked experts [E, K, N] (not the shared ones)


def _routed(p: tuple) -> bool:
    return p[-1] in ROUTED and p[-2] == "mlp" and p[0] != "dense_blocks"


def _dequantized(p: tuple, w: QuantizedWeight) -> jax.Array:
    """The kept weight at path ``p`` as f32: routed experts one expert at a time (their scale is
    [E, K/128, N/128]), the rest in their [K, N] flattening."""
    if _routed(p):
        return jax.vmap(lambda q, s: dequantize(QuantizedWeight(q, s), 1))(w.q, w.scale)
    return dequantize(w, 2 if p[-1] in ("wq_b", "wkv_b") else 1)


def _linear_weights(model) -> set:
    """Paths of every linear weight (all parameters but the embedding, head, router and norms)."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {p for p, _ in params if p[-1] not in ("embed", "head", "scale") and "router" not in p}


def test_kept_weights_are_the_checkpoints_e4m3_and_scales(models):
    """What is kept: every linear weight of the model (attention, dense FFN, shared and routed
    experts, MTP), q in e4m3 whose dequantisation is bitwise the imported weight; the routed experts
    stacked per layer (q [E, d, f], one scale per expert and block); the bf16 tensors are not."""
    kept, deq = models
    assert kept.cfg.gemm_recipe == "fp8" and deq.cfg.gemm_recipe == "bf16"
    weights = _kept(kept)
    names = {p[-2:] if p[-2] in ("attn", "shared") else p[-1:] for p in weights}
    assert names == {("attn", w) for w in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")} | {
        ("shared", w) for w in ("w_gate", "w_up", "w_down")
    } | {("w_gate",), ("w_up",), ("w_down",), ("eh_proj",)}
    assert set(weights) == _linear_weights(deq)
    ref = dict(nnx.to_flat_state(nnx.state(deq)))
    for p, w in weights.items():
        assert w.q.dtype == jnp.float8_e4m3fn and w.scale.dtype == jnp.float32, p
        want = ref[p].get_value()
        assert w.q.shape == want.shape, p
        np.testing.assert_array_equal(np.asarray(_dequantized(p, w)), np.asarray(want), err_msg=str(p))
    e, d, f = CFG.n_routed_experts, CFG.d_model, CFG.moe_ffn_dim
    routed = {p: w for p, w in weights.items() if _routed(p)}
    assert len(routed) == 6  # the MoE block's and the MTP block's w_gate, w_up, w_down
    for p, w in routed.items():  # one scale per expert: a [K/128, N/128] slice per expert, not one for all
        assert w.q.shape == ((e, f, d) if p[-1] == "w_down" else (e, d, f)) and w.scale.shape == (e, 1, 1), p
        assert len(set(np.asarray(w.scale).ravel().tolist())) == e, p


def test_kept_weights_take_half_the_bytes_of_bf16(models):
    """Counted (``fp8_weights.nbytes``): every linear weight of the model, i.e. all parameters but the
    embedding, head, router and norms (those stay f32 here, bf16 in DeepSeek's release): q one byte
    per weight (exactly half of bf16), scales 4 bytes per (possibly partial) 128x128 block. The
    routed experts are 3/4 of these weights' entries in this model."""
    counts = fp8_weights.nbytes(models[0])
    weights = _kept(models[0])
    n = sum(w.q.size for w in weights.values())
    blocks = sum(w.scale.size for w in weights.values())
    whole = dict(nnx.to_flat_state(nnx.state(models[1])))
    assert n == sum(whole[p].get_value().size for p in _linear_weights(models[1]))
    assert sum(w.q.size for p, w in weights.items() if _routed(p)) == 6 * 4 * 128 * 128
    assert counts == dict(fp8=n + 4 * blocks, bf16=2 * n)
    assert counts["fp8"] / counts["bf16"] < 0.5 * (1 + 2 / 4096)  # wkv_a's partial blocks: < 2 scales / 16384


def test_logits_equal_the_dequantised_import_under_the_same_fp8_matmul(models, fp8_dir):
    """Same recipe, same numbers: the kept e4m3 blocks against the dequantised weights that the recipe
    re-quantises (the checkpoint's scales round-trip, ``_scale``), activations quantised per 1x128 in
    both: the same operands through the same ops, so the logits are bitwise equal (a difference in
    summation order alone would be f32 rounding, but it can flip an activation's e4m3 rounding in
    the next layer, so no small tolerance would be derived from the format). Against the f32 path
    (dequantised weights, unquantised activations) they differ by the activations' e4m3 rounding,
    bounded per GEMM in ``test_each_kept_gemm_is_within_e4m3_rounding_of_the_f32_product``.
    Stacked layers (``scan_layers``: q [L, E, d, f], scale [L, E, 1, 1]) give the same logits."""
    kept, deq = models
    ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)), jnp.int32)
    got = np.asarray(_logits(kept, ids))
    want = np.asarray(_logits(_with_recipe(deq, "fp8"), ids))
    np.testing.assert_array_equal(got, want)
    stacked = hf.from_pretrained(fp8_dir, dtype="float32", keep_fp8=True, scan_layers=True)
    w = _kept(stacked)[("moe_blocks", "mlp", "w_gate")]
    assert w.q.shape == (1, 4, 128, 128) and w.scale.shape == (1, 4, 1, 1)
    np.testing.assert_array_equal(np.asarray(_logits(stacked, ids)), got)


def test_generation_runs_the_kept_weights(models):
    """Greedy decoding with the naive cache (every projection through the FP8 matmul, one token's
    activations scaled on their own) picks the tokens the full forward pass of the same kept model
    ranks first (teacher-forced on the generated sequence); with the absorbed cache (W_UK / W_UV
    folded from the dequantised wkv_b, plain) it generates exactly what the dequantise-at-import
    model generates under the fp8 recipe (the two models' logits are bitwise equal, above). The
    absorbed cache is only FP8-error close to the forward (``tests/model/test_fp8_model.py``), so its
    tokens are not compared with the forward's argmax."""
    kept, deq = models
    prompts = np.random.RandomState(2).randint(0, CFG.vocab_size, (2, 21)).tolist()
    new = generate_details(kept, prompts, max_new_tokens=3, cache="naive").tokens
    seq = np.array([p + t[:2] + t[1:2] for p, t in zip(prompts, new)], np.int32)  # [2, 24]: last one pads
    logits = np.asarray(_logits(kept, jnp.asarray(seq)))[:, 20:23]  # [2, 3, V] predicting the new tokens
    assert logits.argmax(-1).tolist() == new
    top2 = np.sort(logits, -1)[..., -2:]
    assert np.all(top2[..., 1] - top2[..., 0] > 1e-3)  # no near tie decides the comparison
    absorbed = generate_details(kept, prompts, max_new_tokens=3).tokens
    assert absorbed == generate_details(_with_recipe(deq, "fp8"), prompts, max_new_tokens=3).tokens
    # A batch-1 server's weights (``prepare_for``): the kept experts stay stacked for the layer's
    # grouped FP8 matmul (decode steps under a quantized recipe run it), not split per expert.
    assert [lw.experts for lw in prepare_for(kept, 1).weights] == [None] * CFG.n_layers


def test_grouped_matmul_takes_the_kept_experts(models):
    """``model.grouped_matmul.gmm`` with a kept expert stack (an empty expert, rows of none): under
    "fp8" every XLA engine ("scan", the CPU default; "ragged_dot") gives the grouped product of the
    stored blocks (``grouped_prequantized_matmul``), forward and dgrad, and the same as the training
    recipe on the dequantised weights (whose re-quantisation gives back the stored blocks, ``_scale``);
    under "bf16" the dequantised weight's plain product. Expert parallelism refuses kept experts."""
    kept, deq = models
    path = ("moe_blocks", 0, "mlp", "w_gate")
    w, w_deq = _kept(kept)[path], dict(nnx.to_flat_state(nnx.state(deq)))[path].get_value()
    sizes = jnp.asarray([5, 0, 9, 3], jnp.int32)  # 17 of 20 rows owned
    x = jax.random.normal(jax.random.key(0), (20, CFG.d_model), jnp.float32)
    g = jax.random.normal(jax.random.key(1), (20, CFG.moe_ffn_dim), jnp.float32)

    @functools.partial(jax.jit, static_argnames="impl")
    def y_dx(w, impl):  # the product and its dgrad (vjp in x)
        if impl == "reference":
            fn = lambda a: grouped_prequantized_matmul(a, w.q, w.scale, sizes, impl="xla")  # noqa: E731
        else:
            fn = lambda a: gmm(a, w, sizes, impl=impl, tile=8, recipe="fp8")  # noqa: E731
        y, vjp = jax.vjp(fn, x)
        return y, *vjp(g)

    want = y_dx(w, "reference")
    for impl in ("scan", "ragged_dot"):
        for a, b in zip(y_dx(w, impl), want):
            assert_close(a, b, composite=True, err_msg=impl)
    assert not np.asarray(want[0])[17:].any() and np.asarray(want[0])[:17].all()
    mm = jax.jit(functools.partial(gmm, x, group_sizes=sizes, impl="scan", tile=8), static_argnames="recipe")
    assert_close(mm(w_deq, recipe="fp8"), want[0], composite=True)
    np.testing.assert_array_equal(mm(w, recipe="bf16"), mm(w_deq, recipe="bf16"))
    ep = ExpertParallel(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",)), (), ("expert",), ())
    with pytest.raises(ValueError, match="expert parallelism .* kept-FP8 experts"):
        kept.moe_blocks[0].mlp(x[None], jnp.ones((1, 20), jnp.int32), ep=ep)


def test_each_kept_gemm_is_within_e4m3_rounding_of_the_f32_product(models):
    """The format's tolerance, derived: x is rounded to e4m3 per 1x128 tile with scale s = amax/448.
    e4m3 has 3 mantissa bits, so a normal value (|x/s| >= 2^-6) moves by at most 2^-4 of itself and
    a subnormal one by at most half the subnormal spacing, 2^-10 s. With the weight exact (it is the
    stored q * scale), |y - y_f32| <= sum_k (2^-4 |x_k| + 2^-10 s_k) |w_kn| + f32 accumulation."""
    rng = np.random.RandomState(1)
    weights = _kept(models[0])
    # one of each layout: two output axes and a non-square block grid, a partial block, two K axes
    for p in [
        ("moe_blocks", 0, "attn", "wq_b"),
        ("dense_blocks", 0, "attn", "wkv_a"),
        ("mtp", 0, "block", "attn", "wo"),
    ]:
        w = weights[p]
        n_out = 2 if p[-1] in ("wq_b", "wkv_b") else 1
        w2 = QuantizedWeight(w.q.reshape(-1, int(np.prod(w.q.shape[-n_out:]))), w.scale)  # [K, N]
        kk = w2.q.shape[0]
        x = (rng.standard_normal((16, kk)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
        x[0, :5] = 1e-6  # subnormal after scaling
        got = np.asarray(linear("mk,kn->mn", jnp.asarray(x), w2, dtype="float32", recipe="fp8"), np.float64)
        wd = np.asarray(dequantize(w2, 1), np.float64)
        exact = x.astype(np.float64) @ wd
        kp = -(-kk // 128) * 128
        amax = np.abs(np.pad(x, ((0, 0), (0, kp - kk)))).reshape(16, -1, 128).max(-1)  # [m, K/128]
        s = np.repeat(amax * np.float64(INV), 128, 1)[:, :kk]
        bound = (2.0**-4 * np.abs(x) + 2.0**-10 * s) @ np.abs(wd) + 1e-6 * (np.abs(x) @ np.abs(wd))
        assert np.all(np.abs(got - exact) <= bound), (p, np.max(np.abs(got - exact) / bound))
        assert np.max(np.abs(got - exact) / bound) > 0.05, p  # the bound is not vacuous: rounding is seen


def test_keep_fp8_refuses_a_checkpoint_it_cannot_keep(fp8_dir, tmp_path):
    """Not FP8, or blocks other than the recipe's 128x128: one error naming what config.json has."""
    path = str(tmp_path / "bf16")
    hf.save_pretrained(Transformer(CFG, rngs=nnx.Rngs(0)), path)
    with pytest.raises(ValueError, match="keep_fp8=True needs an FP8 checkpoint with 128x128 blocks.*none"):
        hf.from_pretrained(path, keep_fp8=True)
    path = str(tmp_path / "blocks64")
    shutil.copytree(fp8_dir, path)
    conf = json.load(open(os.path.join(path, "config.json")))
    conf["quantization_config"]["weight_block_size"] = [64, 64]
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"keep_fp8=True .* 'weight_block_size': \[64, 64\]"):
        hf.from_pretrained(path, keep_fp8=True)


def test_save_pretrained_refuses_kept_fp8_weights_and_writes_nothing(models, tmp_path):
    """Exporting a kept-FP8 model: one error naming the kept weights, before anything is written."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"save_pretrained: \d+ weights are kept in FP8 .*first: "):
        hf.save_pretrained(models[0], str(out))
    assert not out.exists()
