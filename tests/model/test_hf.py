"""Parity with transformers' DeepseekV3ForCausalLM: import, export, MTP and FP8 weights, errors,
and a fine-tune smoke run from a converted checkpoint. Skipped only where torch/transformers are absent."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from model import hf  # noqa: E402

V = 264  # the byte tokenizer's 259 ids fit (fine-tune smoke test)
BASE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=8,
    qk_nope_head_dim=12,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    norm_topk_prob=True,
    rope_interleave=True,
    routed_scaling_factor=2.5,
)
YARN_V3 = dict(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)
YARN_ODD = dict(YARN_V3, mscale=0.9, mscale_all_dim=0.7)
CONFIGS = {
    "qlora_groups_interleave": dict(),
    "no_qlora_flat_rotatehalf_yarn": dict(
        q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False, rope_scaling=YARN_V3
    ),
    "groups4_yarn_mscales_sharded": dict(
        n_group=4, topk_group=2, num_experts_per_tok=3, rope_scaling=YARN_ODD, n_shared_experts=2
    ),
}


# Parity bound for f32 logits against transformers: ~1-2e-6 is achieved (printed by the parity
# test), so 1e-5 leaves a 5x margin while an RMSNorm eps of 1e-5 instead of 1e-6 (~1e-3 here)
# or any real difference in the maths fails it.
PARITY_ATOL = 1e-5


def _hf_model(**over):
    cfg = transformers.DeepseekV3Config(**{**BASE, **over}, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.1)
        for mod in m.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.1)
    return m


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _ids(b=2, t=40, seed=0):
    return np.random.RandomState(seed).randint(0, V, (b, t)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The base tiny model saved as one file."""
    path = str(tmp_path_factory.mktemp("hf_base"))
    m = _hf_model()
    m.save_pretrained(path)
    return path, m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_export_logits_match_transformers(name, tmp_path):
    m = _hf_model(**CONFIGS[name])
    src = str(tmp_path / "src")
    m.save_pretrained(src, max_shard_size="20KB" if "sharded" in name else "1GB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json")) == ("sharded" in name)
    model = hf.from_pretrained(src)
    assert model.cfg.param_dtype == "float32" and model.cfg.mtp_depth == 0
    ids = _ids()
    ref = _hf_logits(m, ids)
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |logits - transformers| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= PARITY_ATOL

    out = str(tmp_path / "export")
    hf.save_pretrained(model, out, max_shard_bytes=30_000)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    diff_back = np.abs(_hf_logits(back, ids) - ref).max()
    print(f"{name}: export -> transformers: max diff {diff_back:.3g}")
    assert diff_back == 0.0  # the same f32 weights in the same library: bitwise the same logits


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_softmax_router_import_export(tmp_path, topk_method):
    """DeepseekV2ForCausalLM (V2-Lite style: no q_lora, softmax greedy router, 2 shared experts; or
    V2's group_limited_greedy, groups scored by their max score)."""
    groups = dict(n_group=4, topk_group=2) if topk_method == "group_limited_greedy" else {}
    cfg = transformers.DeepseekV2Config(
        **{k: v for k, v in BASE.items() if k not in ("n_group", "topk_group", "norm_topk_prob", "rope_interleave")},
        **groups,
        attn_implementation="eager",
        topk_method=topk_method,
        norm_topk_prob=False,
    )
    cfg.q_lora_rank, cfg.n_shared_experts, cfg.routed_scaling_factor = None, 2, 1.5
    cfg.rope_parameters = dict(YARN_V3, rope_type="yarn", mscale=0.707, mscale_all_dim=0.707, rope_theta=10000.0)
    torch.manual_seed(0)
    m = transformers.DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(
                0, 0.5 / p.shape[-1] ** 0.5
            )
    m.save_pretrained(str(tmp_path / "src"))
    model = hf.from_pretrained(str(tmp_path / "src"))
    assert (model.cfg.score_fn, model.cfg.q_lora_rank, model.cfg.use_aux_free_bias) == ("softmax", None, False)
    assert (model.cfg.n_group, model.cfg.group_score) == ((4, "max") if groups else (1, "max"))
    ids = _ids()
    ref = _hf_logits(m, ids)
    diff = np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref).max()
    print(f"deepseek_v2: max |logits - transformers| = {diff:.3g}")
    assert diff <= PARITY_ATOL
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager")
    assert type(back).__name__ == "DeepseekV2ForCausalLM" and back.config.topk_method == topk_method
    assert np.abs(_hf_logits(back.eval(), ids) - ref).max() == 0.0


def test_stacked_layers_import_export(hf_dir, tmp_path):
    """``scan_layers=True``: the MoE blocks are one stacked module ([l, ...] leaves, what the pod
    trains); import gives transformers' logits, export writes every tensor back bitwise."""
    from model.block import Block

    src, m = hf_dir
    model = hf.from_pretrained(src, scan_layers=True)
    assert isinstance(model.moe_blocks, Block) and model.moe_blocks.mlp.router.bias[...].shape == (2, 8)
    ids = _ids()
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - _hf_logits(m, ids)).max() <= PARITY_ATOL
    out = str(tmp_path / "export")
    hf.save_pretrained(model, out)
    written, original = (
        load_file(os.path.join(out, "model.safetensors")),
        load_file(os.path.join(src, "model.safetensors")),
    )
    assert set(written) == set(original)
    for k, a in original.items():
        np.testing.assert_array_equal(written[k], a, err_msg=k)


def test_mtp_weights_round_trip(hf_dir, tmp_path):
    src, _ = hf_dir
    path = str(tmp_path / "with_mtp")
    shutil.copytree(src, path)
    conf = json.load(open(os.path.join(path, "config.json")))
    conf["num_nextn_predict_layers"] = 1
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    base = load_file(os.path.join(path, "model.safetensors"))
    # DeepSeek's layer-N tensors: a full MoE block plus enorm/hnorm/eh_proj/shared_head, and copies
    # of the embedding and head; random values of the right shapes.
    rng = np.random.RandomState(1)
    n = conf["num_hidden_layers"]
    extra = {}
    for k, a in base.items():
        if k.startswith(f"model.layers.{n - 1}."):
            extra[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = rng.normal(0, 0.1, a.shape).astype(np.float32)
    d = conf["hidden_size"]
    pre = f"model.layers.{n}"
    extra.update(
        {
            f"{pre}.enorm.weight": rng.normal(1, 0.1, d).astype(np.float32),
            f"{pre}.hnorm.weight": rng.normal(1, 0.1, d).astype(np.float32),
            f"{pre}.eh_proj.weight": rng.normal(0, 0.1, (d, 2 * d)).astype(np.float32),
            f"{pre}.shared_head.norm.weight": rng.normal(1, 0.1, d).astype(np.float32),
            f"{pre}.shared_head.head.weight": base["lm_head.weight"],
            f"{pre}.embed_tokens.weight": base["model.embed_tokens.weight"],
        }
    )
    save_file(extra, os.path.join(path, "mtp.safetensors"))
    model = hf.from_pretrained(path)
    assert model.cfg.mtp_depth == 1
    mtp = model.mtp[0]
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj[...]), extra[f"{pre}.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.enorm.scale[...]), extra[f"{pre}.enorm.weight"])
    np.testing.assert_array_equal(np.asarray(mtp.norm.scale[...]), extra[f"{pre}.shared_head.norm.weight"])
    np.testing.assert_array_equal(
        np.asarray(mtp.block.mlp.w_down[...][3]), extra[f"{pre}.mlp.experts.3.down_proj.weight"].T
    )
    np.testing.assert_array_equal(
        np.asarray(mtp.block.mlp.router.bias[...]), extra[f"{pre}.mlp.gate.e_score_correction_bias"]
    )
    out = str(tmp_path / "export")
    hf.save_pretrained(model, out)
    written = load_file(os.path.join(out, "model.safetensors"))
    for k, a in extra.items():
        np.testing.assert_array_equal(written[k], a, err_msg=k)
    assert set(written) == set(base) | set(extra)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids(1, 16)  # transformers ignores the MTP layer; the main model is unchanged
    assert np.abs(_hf_logits(back, ids) - np.asarray(model(jnp.asarray(ids)).logits)).max() <= PARITY_ATOL


def test_fp8_block_scaled_weights_are_dequantized(hf_dir, tmp_path):
    """DeepSeek's FP8 release: e4m3 weights with one ``weight_scale_inv`` per block. The 16x16 blocks
    here leave partial blocks at the edges as V3's 128-blocks do (its 576-row kv_a_proj_with_mqa
    is 4.5 blocks): kv_a 24 rows = 1.5 blocks, q_b 40 x 24 = 2.5 x 1.5, the experts' 16 x 32 and
    32 x 16 whole. Every imported tensor equals the dequantised one, and the logits equal
    transformers' with the dequantised weights."""
    src, m = hf_dir
    path = str(tmp_path / "fp8")
    shutil.copytree(src, path)
    conf = json.load(open(os.path.join(path, "config.json")))
    block = [16, 16]
    conf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    want, partial = {}, set()
    for k in list(tensors):
        w = tensors[k]
        if w.ndim != 2 or "embed" in k or "lm_head" in k or k.endswith("gate.weight"):
            continue  # DeepSeek keeps these in high precision
        o, i = w.shape
        so, si = -(-o // block[0]), -(-i // block[1])
        if o % block[0] or i % block[1]:
            partial.add(k)
        scale = np.empty((so, si), np.float32)  # amax over each block's own (possibly partial) extent
        for a in range(so):
            for b in range(si):
                tile = w[a * block[0] : (a + 1) * block[0], b * block[1] : (b + 1) * block[1]]
                scale[a, b] = max(np.abs(tile).max(), 1e-8) / 448.0
        full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:o, :i]
        q = (w / full).astype(ml_dtypes.float8_e4m3fn)
        tensors[k], tensors[k + "_scale_inv"] = q, scale
        want[k] = q.astype(np.float32) * full
    assert {"model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.q_b_proj.weight"} <= partial
    save_file(tensors, os.path.join(path, "model.safetensors"))
    model = hf.from_pretrained(path, dtype="float32")
    ours = dict(hf.hf_tensors(model))
    for k, w in want.items():
        np.testing.assert_array_equal(ours[k], w, err_msg=k)

    deq = str(tmp_path / "dequantised")  # the original checkpoint with the dequantised weights
    shutil.copytree(src, deq)
    save_file({**load_file(os.path.join(src, "model.safetensors")), **want}, os.path.join(deq, "model.safetensors"))
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(deq, attn_implementation="eager").eval()
    ids = _ids()
    diff = np.abs(np.asarray(model(jnp.asarray(ids)).logits) - _hf_logits(ref, ids)).max()
    assert diff <= PARITY_ATOL, diff
    assert not np.allclose(_hf_logits(ref, ids), _hf_logits(m, ids), atol=1e-3)  # fp8 moved the logits
    assert hf.from_pretrained(path).cfg.param_dtype == "bfloat16"  # FP8 checkpoints default to bf16


def _edit_config(path, **changes):
    conf = json.load(open(os.path.join(path, "config.json")))
    conf.update(changes)
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))


def test_errors_name_the_file_and_tensor_or_field(hf_dir, tmp_path):
    src, m = hf_dir
    sharded = str(tmp_path / "sharded")
    m.save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[2]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(FileNotFoundError, match=victim):
        hf.from_pretrained(sharded)

    bad = str(tmp_path / "shape")
    shutil.copytree(src, bad)
    _edit_config(bad, moe_intermediate_size=20)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\..*' has shape"):
        hf.from_pretrained(bad)

    missing = str(tmp_path / "missing")
    shutil.copytree(src, missing)
    t = load_file(os.path.join(missing, "model.safetensors"))
    del t["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(t, os.path.join(missing, "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.layers\.2\.self_attn\.kv_b_proj\.weight \(index: not listed\)"):
        hf.from_pretrained(missing)

    for change, pattern in [
        (dict(architectures=["MistralForCausalLM"]), "'architectures'"),
        (dict(sliding_window=4096), "sliding_window"),
        (dict(hidden_act="gelu"), "'hidden_act'"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_scaling.type"),
    ]:
        d = str(tmp_path / f"cfg{len(os.listdir(tmp_path))}")
        shutil.copytree(src, d)
        _edit_config(d, **change)
        with pytest.raises(ValueError, match=pattern):
            hf.from_pretrained(d)


def test_finetune_from_converted_checkpoint(hf_dir, tmp_path):
    """tools.convert_hf import -> train_and_evaluate with train.init_checkpoint: the first step's
    loss is the converted model's loss on that batch (so step 0 holds the HF weights)."""
    from configs.base import build
    from model.loss import lm_losses
    from tools import convert_hf
    from train import data as data_lib
    from train.trainer import train_and_evaluate

    src, _ = hf_dir
    ckpt = str(tmp_path / "ckpt")
    cfg = convert_hf.import_hf(src, ckpt)
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(3):
        (text / f"doc{i}.txt").write_text(("hello world %d " % i) * 40)
    config = build("moe_tiny")
    for k, v in dataclasses.asdict(cfg).items():
        config.model[k] = v
    config.data.source = str(text / "*.txt")
    config.data.seq_len = 32
    config.data.val_percent = 34
    t = config.train
    t.steps, t.eval_batches, t.global_batch_size, t.eval_every, t.checkpoint_every = 2, 1, 2, 2, 2
    t.tracker, t.progress, t.async_checkpoint, t.init_checkpoint = "none", False, False, ckpt
    config.optimizer.warmup_steps = 1
    t.peak_flops = 1e12  # skip the matmul benchmark
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir))
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    batch = next(data_lib.make_train_iterator(config.data, global_batch_size=2, process_index=0, process_count=1))
    model = hf.from_pretrained(src)
    out = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    want = float(lm_losses(out, {k: jnp.asarray(v) for k, v in batch.items()}, 0.3)["main_loss"])
    np.testing.assert_allclose(first["main_loss"], want, rtol=1e-5)

    # export from the training workdir (its newest checkpoint) -> transformers gives our logits
    tuned = convert_hf.load_model(str(workdir))
    assert not np.array_equal(np.asarray(tuned.head[...]), np.asarray(model.head[...]))  # 2 steps moved it
    out = str(tmp_path / "export")
    convert_hf.export_hf(str(workdir), out)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids(1, 16)
    assert np.abs(_hf_logits(back, ids) - np.asarray(tuned(jnp.asarray(ids)).logits)).max() <= PARITY_ATOL
