"""Hugging Face checkpoints in and out: ``from_pretrained(dir) -> Transformer``, ``save_pretrained``.

A Hugging Face DeepSeek-V3 / V2, Llama, Qwen2 or Qwen3 directory holds ``config.json`` and one or many ``*.safetensors`` shards
(``model.safetensors.index.json`` maps tensor -> shard). ``config_from_hf`` (``model/hf_config.py``; ``model/hf_gqa.py`` for the
grouped-query attention models) maps config.json to a ``ModelConfig`` (a rename, see ``model/config.py``); anything we cannot represent exactly is an
error naming the field. Weights are streamed shard by shard with safetensors' numpy API into an
abstract model (``nnx.eval_shape``): each parameter's buffer is allocated when its first piece
arrives and handed to JAX as soon as its last piece (e.g. the last expert) is in, so peak host
memory is one copy of the model plus one tensor.

Layout differences (torch Linear weights are [out, in]; ours are [in, ..., out]):

  embed_tokens [V, d] = embed                 lm_head [V, d] = head^T
  q_proj / q_b_proj [h(n+r), d|q] -> wq / wq_b [d|q, h, n+r]      q_a_proj [q, d] -> wq_a [d, q]
  kv_a_proj_with_mqa [c+r, d] -> wkv_a [d, c+r]   kv_b_proj [h(n+v), c] -> wkv_b [c, h, n+v]
  o_proj [d, hv] -> wo [h, v, d]
  mlp.experts.{i}.{gate,up}_proj [f, d] -> w_gate/w_up[i] [d, f]; down_proj [d, f] -> w_down[i] [f, d]
  mlp.shared_experts.* -> mlp.shared (one SwiGLU of width n_shared * f; Qwen2-MoE: mlp.shared_expert.*)
  mlp.shared_expert_gate.weight [1, d] -> mlp.shared_gate [d, 1] (Qwen2-MoE)
  mlp.gate.weight [e, d] -> router.weight [d, e]; mlp.gate.e_score_correction_bias -> router.bias
  model.layers.{N + k}.{enorm, hnorm, eh_proj, shared_head.norm, <block>} -> mtp[k] (transformers
  drops these; we keep them). Their ``embed_tokens`` / ``shared_head.head`` copies are the main
  model's (shared in ``MTPModule``); a differing copy is reported, not loaded.

RoPE: with ``rope_interleave`` both transformers and DeepSeek's reference rotate the pairs
(x[2i], x[2i+1]) (transformers then writes the result de-interleaved, we keep the layout: q and k
are permuted alike, so every q.k is the same); without it the pairs are (x[i], x[i + r/2]).
DeepSeek's FP8 release (``quantization_config.quant_method = "fp8"``) stores e4m3 weights with
``weight_scale_inv`` per 128x128 block: w = w_fp8 * scale_inv, dequantised here to the param dtype,
or with ``keep_fp8=True`` kept as e4m3 + scales for the linear layers and the routed experts
(``model/fp8_weights.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from model import fp8_weights, hf_config, hf_gqa, hf_qwen_moe
from model.config import ModelConfig
from model.hf_config import EXEC_FIELDS  # noqa: F401 (re-exported)
from model.linear import QuantizedWeight
from model.transformer import Transformer

ARCHITECTURES = hf_config.ARCHITECTURES + tuple(hf_gqa.ARCHITECTURES) + tuple(hf_qwen_moe.ARCHITECTURES)


def config_from_hf(hf: dict, **kw) -> ModelConfig:
    """config.json -> ModelConfig: ``model/hf_gqa.py`` for Llama / Qwen2 / Qwen3, ``model/hf_qwen_moe.py``
    for Qwen3-MoE / Qwen2-MoE, else ``model/hf_config.py`` (DeepSeek-V3 / V2, which names what it refuses)."""
    arch = (hf.get("architectures") or [None])[0]
    hf_config._need(
        arch in ARCHITECTURES, "architectures", hf.get("architectures"), f"supported: {list(ARCHITECTURES)}"
    )
    for mapping in (hf_gqa, hf_qwen_moe):
        if arch in mapping.ARCHITECTURES:
            return mapping.config_from_hf(hf, **kw)
    return hf_config.config_from_hf(hf, **kw)


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.attention_type == "mla":
        return hf_config.config_to_hf(cfg)
    return (hf_qwen_moe if cfg.n_moe_layers else hf_gqa).config_to_hf(cfg)


_INDEX = "model.safetensors.index.json"

# ---------------------------------------------------------------------------------------------
# Tensor names: one Spec per Hugging Face tensor.


class Spec(NamedTuple):
    name: str  # Hugging Face tensor name
    path: tuple  # our nnx state path
    index: tuple  # leading indices into our array (stacked layer, expert)
    hf_shape: tuple  # shape in the checkpoint
    transpose: bool  # torch Linear [out, in]: transposed, then reshaped to our slice


def _block_specs(cfg: ModelConfig, pre: str, path: tuple, idx: tuple, moe: bool) -> list[Spec]:
    d, h, n, r, v, c = (
        cfg.d_model,
        cfg.n_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    out = []

    def add(name, sub, shape, transpose=True, extra=()):
        out.append(Spec(f"{pre}.{name}", path + sub, idx + extra, tuple(shape), transpose))

    add("input_layernorm.weight", ("attn_norm", "scale"), (d,), False)
    add("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), False)
    a = "self_attn"
    if cfg.attention_type == "gqa":
        for name, sub, shape, transpose in hf_gqa.attention_tensors(cfg):
            add(f"{a}.{name}", sub, shape, transpose)
    elif cfg.q_lora_rank is None:
        add(f"{a}.q_proj.weight", ("attn", "wq"), (h * (n + r), d))
    else:
        add(f"{a}.q_a_proj.weight", ("attn", "wq_a"), (cfg.q_lora_rank, d))
        add(f"{a}.q_a_layernorm.weight", ("attn", "q_norm", "scale"), (cfg.q_lora_rank,), False)
        add(f"{a}.q_b_proj.weight", ("attn", "wq_b"), (h * (n + r), cfg.q_lora_rank))
    if cfg.attention_type == "mla":
        add(f"{a}.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), (c + r, d))
        add(f"{a}.kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), (c,), False)
        add(f"{a}.kv_b_proj.weight", ("attn", "wkv_b"), (h * (n + v), c))
        add(f"{a}.o_proj.weight", ("attn", "wo"), (d, h * v))
    if not moe:
        f = cfg.dense_ffn_dim
        add("mlp.gate_proj.weight", ("mlp", "w_gate"), (f, d))
        add("mlp.up_proj.weight", ("mlp", "w_up"), (f, d))
        add("mlp.down_proj.weight", ("mlp", "w_down"), (d, f))
        return out
    e, f = cfg.n_routed_experts, cfg.moe_ffn_dim
    add("mlp.gate.weight", ("mlp", "router", "weight"), (e, d))
    if cfg.use_aux_free_bias:
        add("mlp.gate.e_score_correction_bias", ("mlp", "router", "bias"), (e,), False)
    for i in range(e):
        add(f"mlp.experts.{i}.gate_proj.weight", ("mlp", "w_gate"), (f, d), extra=(i,))
        add(f"mlp.experts.{i}.up_proj.weight", ("mlp", "w_up"), (f, d), extra=(i,))
        add(f"mlp.experts.{i}.down_proj.weight", ("mlp", "w_down"), (d, f), extra=(i,))
    if cfg.n_shared_experts:
        fs = cfg.n_shared_experts * f
        sh = "mlp.shared_expert" if cfg.shared_expert_gate else "mlp.shared_experts"  # Qwen2-MoE's name : DeepSeek's
        add(f"{sh}.gate_proj.weight", ("mlp", "shared", "w_gate"), (fs, d))
        add(f"{sh}.up_proj.weight", ("mlp", "shared", "w_up"), (fs, d))
        add(f"{sh}.down_proj.weight", ("mlp", "shared", "w_down"), (d, fs))
    if cfg.shared_expert_gate:
        add("mlp.shared_expert_gate.weight", ("mlp", "shared_gate"), (1, d))
    return out


def weight_specs(cfg: ModelConfig) -> list[Spec]:
    """Every tensor of the Hugging Face layout, mapped onto our parameters."""
    d, V = cfg.d_model, cfg.vocab_size
    specs = [
        Spec("model.embed_tokens.weight", ("embed",), (), (V, d), False),
        Spec("model.norm.weight", ("final_norm", "scale"), (), (d,), False),
    ]
    if not cfg.tie_word_embeddings:  # tied: transformers writes no lm_head
        specs.insert(1, Spec("lm_head.weight", ("head",), (), (V, d), True))
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}"
        if i < cfg.first_k_dense and cfg.scan_layers and cfg.n_moe_layers == 0:  # a stacked dense model
            specs += _block_specs(cfg, pre, ("dense_blocks",), (i,), moe=False)
        elif i < cfg.first_k_dense:
            specs += _block_specs(cfg, pre, ("dense_blocks", i), (), moe=False)
        elif cfg.scan_layers:
            specs += _block_specs(cfg, pre, ("moe_blocks",), (i - cfg.first_k_dense,), moe=True)
        else:
            specs += _block_specs(cfg, pre, ("moe_blocks", i - cfg.first_k_dense), (), moe=True)
    for k in range(cfg.mtp_depth):
        pre, path = f"model.layers.{cfg.n_layers + k}", ("mtp", k)
        specs += [
            Spec(f"{pre}.enorm.weight", path + ("enorm", "scale"), (), (d,), False),
            Spec(f"{pre}.hnorm.weight", path + ("hnorm", "scale"), (), (d,), False),
            Spec(f"{pre}.eh_proj.weight", path + ("eh_proj",), (), (d, 2 * d), True),
            Spec(f"{pre}.shared_head.norm.weight", path + ("norm", "scale"), (), (d,), False),
        ]
        specs += _block_specs(cfg, pre, path + ("block",), (), moe=cfg.n_moe_layers > 0)
    return specs


def _shared_copies(cfg: ModelConfig) -> dict:
    """MTP layers' copies of the shared embedding / head (DeepSeek's release stores them)."""
    out = {}
    for k in range(cfg.mtp_depth):
        pre = f"model.layers.{cfg.n_layers + k}"
        out[f"{pre}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{pre}.shared_head.head.weight"] = "lm_head.weight"
    return out


# ---------------------------------------------------------------------------------------------
# Reading


def _header(file: str) -> dict:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n


class _Shard:
    """One safetensors file: numpy tensors via safetensors, F8_E4M3 read raw (numpy has no fp8)."""

    def __init__(self, file: str):
        from safetensors import safe_open

        self.file = file
        self.header, self.data_start = _header(file)
        self.header.pop("__metadata__", None)
        self._f = safe_open(file, framework="np")

    def keys(self) -> list[str]:
        return sorted(self.header)

    def get(self, key: str) -> np.ndarray:
        meta = self.header[key]
        if meta["dtype"] == "F8_E4M3":
            start, end = meta["data_offsets"]
            raw = np.fromfile(self.file, np.uint8, count=end - start, offset=self.data_start + start)
            return raw.view(ml_dtypes.float8_e4m3fn).reshape(meta["shape"])
        return self._f.get_tensor(key)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: Iterable[int] = (128, 128)) -> np.ndarray:
    """DeepSeek's block FP8: w [o, i] e4m3 times scale_inv [ceil(o/bo), ceil(i/bi)] per block -> f32."""
    bo, bi = block
    o, i = w.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=0), bi, axis=1)[:o, :i]
    return w.astype(np.float32) * s


def _weight_map(path: str) -> dict:
    """tensor name -> shard file name."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as fh:
            return dict(json.load(fh)["weight_map"])
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {_INDEX} and no *.safetensors files")
    out = {}
    for f in files:
        for k in _header(os.path.join(path, f))[0]:
            if k != "__metadata__":
                out[k] = f
    return out


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: not a Hugging Face model directory")
    with open(file) as fh:
        return json.load(fh)


def from_pretrained(path: str, *, dtype: Optional[str] = None, keep_fp8: bool = False, **overrides) -> Transformer:
    """Load a Hugging Face DeepSeek-V3/V2, Llama/Qwen2/Qwen3 or Qwen-MoE directory as a ``Transformer``
    (``model.cfg`` holds the config).

    ``dtype``: param and compute dtype ("float32", "bfloat16"); default the checkpoint's (FP8 ->
    bfloat16). ``overrides``: execution fields (``EXEC_FIELDS``), e.g. ``scan_layers=True``.
    The MTP depth is the number of ``model.layers.{N + k}`` modules actually present (transformers'
    own ``save_pretrained`` writes none even when ``num_nextn_predict_layers`` says 1).
    ``keep_fp8`` (an FP8 checkpoint with 128x128 blocks; inference only): the linear layers' and the
    routed experts' e4m3 weights and scales stay as stored (``model/fp8_weights.py``: half the bytes
    of bf16) and the model runs with ``gemm_recipe="fp8"``; the bf16 tensors load as without it.
    """
    hf = read_config(path)
    wmap = _weight_map(path)
    n = hf.get("num_hidden_layers")
    declared = hf.get("num_nextn_predict_layers", 0) or 0
    present = sum(any(k.startswith(f"model.layers.{n + j}.") for k in wmap) for j in range(declared))
    cfg = config_from_hf(hf, dtype=dtype, mtp_depth=present, **overrides)
    if present < declared:
        logging.warning(
            "%s: config declares %d MTP layer(s), weights hold %d; loading %d.", path, declared, present, present
        )
    q = hf.get("quantization_config") or {}
    block = tuple(q.get("weight_block_size", (128, 128)))
    if keep_fp8:
        if q.get("quant_method") != "fp8" or block != (fp8_weights.BLOCK,) * 2:
            raise ValueError(
                f"{path}: keep_fp8=True needs an FP8 checkpoint with 128x128 blocks (quantization_config "
                f"quant_method 'fp8', weight_block_size [128, 128]); config.json has {q or 'none'}"
            )
        cfg = dataclasses.replace(cfg, gemm_recipe="fp8")

    missing_files = sorted({f for f in wmap.values() if not os.path.exists(os.path.join(path, f))})
    if missing_files:
        f = missing_files[0]
        held = sorted(k for k, v in wmap.items() if v == f)
        raise FileNotFoundError(
            f"{os.path.join(path, f)} is missing: the index lists it for {len(held)} tensor(s), e.g. {held[0]!r}"
        )

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    specs = {s.name: s for s in weight_specs(cfg)}
    pending = {}  # path -> pieces still to come
    for s in specs.values():
        pending[s.path] = pending.get(s.path, 0) + 1
    buffers, done, filled, kept = {}, {}, set(), {}  # kept: path -> stays FP8
    copies, copy_vals = _shared_copies(cfg), {}
    if cfg.tie_word_embeddings:  # some tied checkpoints store the head as well
        copies["lm_head.weight"] = "model.embed_tokens.weight"

    for file in sorted(set(wmap.values())):
        shard = _Shard(os.path.join(path, file))
        for key in shard.keys():
            if key.endswith("_scale_inv") or key.endswith("rotary_emb.inv_freq"):
                continue  # read with their weight / recomputed
            if key in copies:
                copy_vals[key] = (file, shard.get(key))
                continue
            if key not in specs:
                raise ValueError(
                    f"{shard.file}: tensor {key!r} has no place in the model "
                    f"(config: {cfg.n_layers} layers + {cfg.mtp_depth} MTP, "
                    f"first_k_dense={cfg.first_k_dense}); is config.json the right one?"
                )
            s = specs[key]
            arr, sc = shard.get(key), None
            if arr.dtype == ml_dtypes.float8_e4m3fn:
                sname = key + "_scale_inv"
                if sname not in wmap:
                    raise KeyError(f"{shard.file}: FP8 tensor {key!r} has no {sname!r}")
                sfile = wmap[sname]
                sc = (shard if sfile == file else _Shard(os.path.join(path, sfile))).get(sname)
            if tuple(arr.shape) != s.hf_shape:
                raise ValueError(
                    f"{shard.file}: tensor {key!r} has shape {tuple(arr.shape)}, expected {s.hf_shape} from config.json"
                )
            keep = keep_fp8 and sc is not None and s.transpose and fp8_weights.kept(key)
            if kept.setdefault(s.path, keep) != keep:
                raise ValueError(
                    f"{shard.file}: {key!r} is {'' if keep else 'not '}FP8, other pieces of its parameter differ"
                )
            var = flat[s.path]
            if keep:  # e4m3 [o, i] -> [i-dims, o-dims]; scale_inv [o/128, i/128] -> [K/128, N/128]
                _place_fp8(buffers, s, var, arr, sc, shard.file, key)
            else:
                if sc is not None:
                    arr = dequantize_fp8(arr, sc, block)
                if s.path not in buffers:
                    buffers[s.path] = np.empty(var.shape, jnp.dtype(var.dtype))
                buf = buffers[s.path]
                buf[s.index] = (arr.T if s.transpose else arr).reshape(buf.shape[len(s.index) :])
            filled.add(key)
            pending[s.path] -= 1
            if pending[s.path] == 0:  # complete: hand to JAX, drop the host buffer
                got = buffers.pop(s.path)
                done[s.path] = QuantizedWeight(*map(jnp.asarray, got)) if keep else jnp.asarray(got)

    missing = sorted(set(specs) - filled)
    if missing:
        listed = [f"{k} (index: {wmap.get(k, 'not listed')})" for k in missing[:8]]
        raise KeyError(f"{path}: {len(missing)} tensor(s) missing, e.g. " + "; ".join(listed))
    for key, (file, val) in copy_vals.items():
        ref = specs[copies[key]]
        ours = np.asarray(done[ref.path], np.float32)
        val = np.asarray(val, np.float32)
        if val.shape != ref.hf_shape or not np.array_equal(val, ours.T if ref.transpose else ours):
            logging.warning(
                "%s: %s differs from %s; the model shares one tensor (MTP modules: the main model's "
                "embedding and head; a tied head: the embedding), using the latter.",
                file,
                key,
                copies[key],
            )
    for p, var in list(flat.items()):
        if p not in done:  # not in the checkpoint: RouterBias when unused
            done[p] = jnp.zeros(var.shape, var.dtype)
        if kept.get(p):
            flat[p] = fp8_weights.FP8Param(done[p], **{k: v for k, v in var.get_metadata().items() if k == "axes"})
        else:
            var.set_value(done[p])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place_fp8(buffers: dict, s: Spec, var, arr: np.ndarray, sc: np.ndarray, file: str, key: str):
    """Put one kept-FP8 tensor (e4m3 [o, i], scale_inv [ceil(o/128), ceil(i/128)]) into its
    parameter's (q, scale) host buffers at ``s.index``."""
    o, i = arr.shape
    want = fp8_weights.block_shape(o, i)
    if tuple(sc.shape) != want:
        raise ValueError(f"{file}: {key}_scale_inv has shape {tuple(sc.shape)}, expected {want} for 128x128 blocks")
    if s.path not in buffers:
        lead = var.shape[: len(s.index)]
        buffers[s.path] = (
            np.empty(var.shape, ml_dtypes.float8_e4m3fn),
            np.empty(lead + fp8_weights.block_shape(i, o), np.float32),
        )
    q_buf, s_buf = buffers[s.path]
    q_buf[s.index] = arr.T.reshape(q_buf.shape[len(s.index) :])
    s_buf[s.index] = sc.T.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Writing


def hf_tensors(model: Transformer) -> Iterable[tuple[str, np.ndarray]]:
    """(name, array) of the Hugging Face layout, one tensor at a time."""
    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for s in weight_specs(cfg):
        val = flat[s.path].get_value()
        a = np.asarray(jax.device_get(val[s.index] if s.index else val))
        if s.transpose:
            a = a.reshape(s.hf_shape[1], s.hf_shape[0]).T
        yield s.name, np.ascontiguousarray(a.reshape(s.hf_shape))
        if s.name.endswith("mlp.gate.weight") and cfg.score_fn == "sigmoid" and not cfg.use_aux_free_bias:
            # transformers' V3 router always adds a bias: an unused one is zero
            yield s.name.replace(".weight", ".e_score_correction_bias"), np.zeros(cfg.n_routed_experts, np.float32)
        if s.name in ("model.embed_tokens.weight", "lm_head.weight"):
            for copy, ref in _shared_copies(cfg).items():
                if ref == s.name:
                    yield copy, np.ascontiguousarray(a)


def save_pretrained(
    model: Transformer, out_dir: str, *, max_shard_bytes: int = 4 << 30, extra_config: Optional[dict] = None
) -> list[str]:
    """Write config.json + safetensors (sharded with an index when over ``max_shard_bytes``).

    MTP modules are written as ``model.layers.{N + k}.*`` with DeepSeek's names (transformers
    ignores them when loading). Returns the shard file names.
    """
    from safetensors.numpy import save_file

    if kept := [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, fp8_weights.FP8Param))]:
        raise ValueError(
            f"save_pretrained: {len(kept)} weights are kept in FP8 (from_pretrained keep_fp8=True; first: "
            f"{kept[0]}), which this writer does not export: load the checkpoint without keep_fp8 to convert it"
        )
    os.makedirs(out_dir, exist_ok=True)
    conf = config_to_hf(model.cfg)
    conf.update(extra_config or {})
    shards, cur, size = [], {}, 0
    for name, a in hf_tensors(model):
        if cur and size + a.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = a
        size += a.nbytes
    shards.append(cur)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    wmap = {}
    for f, tensors in zip(files, shards):
        save_file(tensors, os.path.join(out_dir, f), metadata={"format": "pt"})
        wmap.update({k: f for k in tensors})
    if len(shards) > 1:
        total = sum(a.nbytes for t in shards for a in t.values())
        with open(os.path.join(out_dir, _INDEX), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(conf, fh, indent=2)
    return files
