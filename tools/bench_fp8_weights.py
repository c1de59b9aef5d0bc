"""Memory of DeepSeek's FP8 weights kept as stored (``from_pretrained(keep_fp8=True)``) against bf16.

  python -m tools.bench_fp8_weights [--preset=moe_tiny] [--layer=deepseek_v3_671b] [--rows=64] [--impl=auto]

1. Loaded weights: writes an FP8 checkpoint of ``--preset`` (random init; every 2-D linear tensor in
   e4m3 with one ``weight_scale_inv`` per 128x128 block, DeepSeek's release format; the embedding,
   head, router and norms stay high precision as there) and loads it twice, ``keep_fp8=True`` and
   dequantised to bfloat16, with and without ``scan_layers``. One JSON line per load: bytes of the
   parameter arrays, all of them and the linear weights alone (the routed experts separately), and
   XLA's memory analysis of the compiled forward pass on 1 x 128 tokens (arguments; ``temp``: the
   scratch beyond them, which on XLA:CPU includes f16 copies of float8 operands, see below).
2. One MoE layer's routed experts (SwiGLU: gate, up, down through ``model.grouped_matmul.gmm``) at
   ``--layer``'s shapes, compiled for ``--rows`` dispatched rows but not run (abstract operands,
   nothing allocated): XLA's ``memory_analysis`` of kept e4m3 experts under ``gemm_recipe="fp8"``
   against bf16 experts under "bf16". ``temp`` is the scratch the product needs beyond its
   arguments: a kept weight is multiplied 128 rows of K at a time, never as an f32 copy of a whole
   [E, K, N] stack (which would be 4x its e4m3 bytes).

XLA:CPU has no float8 arithmetic nor float8 data movement: it converts a float8 operand of a
slice, a loop or a dot to f16 first, so the 128-row slices of a kept weight cost a transient f16
copy of that weight (2 bytes per entry, one projection at a time), and a scan over stacked layers
(``scan_layers``) one of the whole stack. Accelerators with float8 (H100/H200, TPU through the
Pallas kernel) slice the stored bytes; run this there to see their ``temp``.
"""

import argparse
import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from model import fp8_weights, hf, presets
from model.linear import QuantizedWeight
from model.moe import expert_swiglu
from model.transformer import Transformer

BLOCK = fp8_weights.BLOCK


def _quantize(w: np.ndarray):
    """w [o, i] -> (e4m3 [o, i], scale_inv [ceil(o/128), ceil(i/128)] f32): amax / 448 per block."""
    o, i = w.shape
    scale = np.ones(fp8_weights.block_shape(o, i), np.float32)
    for a in range(scale.shape[0]):
        for b in range(scale.shape[1]):
            amax = np.abs(w[a * BLOCK : (a + 1) * BLOCK, b * BLOCK : (b + 1) * BLOCK]).max()
            scale[a, b] = amax / 448 if amax > 0 else 1.0
    full = np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)[:o, :i]
    return np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale


def write_fp8_checkpoint(cfg, path: str):
    from safetensors.numpy import load_file, save_file

    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for k in list(tensors):
        if tensors[k].ndim == 2 and "embed" not in k and "head" not in k and not k.endswith("mlp.gate.weight"):
            tensors[k], tensors[k + "_scale_inv"] = _quantize(tensors[k].astype(np.float32))
    save_file(tensors, file)
    conf = json.load(open(os.path.join(path, "config.json")))
    conf["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", weight_block_size=[BLOCK, BLOCK])
    json.dump(conf, open(os.path.join(path, "config.json"), "w"))


def weight_bytes(model) -> dict:
    """Bytes of the parameter arrays: all, the linear weights (not embedding, head, router, norms),
    and of those the routed experts."""
    out = dict(all=0, linear=0, routed_experts=0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = sum(a.nbytes for a in jax.tree.leaves(var.get_value()))
        out["all"] += n
        if path[-1] not in ("embed", "head", "scale") and "router" not in path:
            out["linear"] += n
            if path[-1] in ("w_gate", "w_up", "w_down") and "shared" not in path and path[0] != "dense_blocks":
                out["routed_experts"] += n
    return out


def loaded(preset: str):
    cfg = presets.get(preset)
    with tempfile.TemporaryDirectory() as path:
        write_fp8_checkpoint(cfg, path)
        for scan in (False, True):
            for keep in (True, False):
                model = hf.from_pretrained(path, dtype="bfloat16", keep_fp8=keep, scan_layers=scan)
                row = dict(bench="fp8_weights_loaded", preset=preset, scan_layers=scan, keep_fp8=keep)
                print(json.dumps(row | weight_bytes(model) | forward_memory(model)), flush=True)


def forward_memory(model, tokens: int = 128) -> dict:
    """XLA's memory analysis of the compiled forward pass on [1, tokens] ids (not run)."""
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    fwd = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i).logits)
    mem = fwd.lower(state, ids).compile().memory_analysis()
    return dict(forward_argument_bytes=mem.argument_size_in_bytes, forward_temp_bytes=mem.temp_size_in_bytes)


def layer(preset: str, rows: int, impl: str):
    cfg = dataclasses.replace(presets.get(preset), kernels_impl=impl, dtype="bfloat16")
    e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
    x = jax.ShapeDtypeStruct((rows, d), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
    shapes = [(e, d, f), (e, d, f), (e, f, d)]

    def kept(shape):
        g, k, n = shape
        return QuantizedWeight(
            jax.ShapeDtypeStruct(shape, jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((g, -(-k // 128), -(-n // 128)), jnp.float32),
        )

    for recipe, weights in (
        ("fp8", [kept(s) for s in shapes]),
        ("bf16", [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]),
    ):
        c = dataclasses.replace(cfg, gemm_recipe=recipe)
        mem = jax.jit(lambda *a, c=c: expert_swiglu(c, *a)).lower(x, sizes, *weights).compile().memory_analysis()
        row = dict(
            bench="fp8_weights_moe_layer",
            shapes=preset,
            rows=rows,
            impl=impl,
            backend=jax.default_backend(),
            weights="kept e4m3" if recipe == "fp8" else "bf16",
            gemm_recipe=recipe,
            argument_bytes=mem.argument_size_in_bytes,
            temp_bytes=mem.temp_size_in_bytes,
            output_bytes=mem.output_size_in_bytes,
            f32_copy_of_weights_bytes=4 * sum(int(np.prod(s)) for s in shapes),
        )
        print(json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="moe_tiny", help="model whose FP8 checkpoint is written and loaded")
    p.add_argument("--layer", default="deepseek_v3_671b", help="preset whose MoE layer shapes are compiled")
    p.add_argument("--rows", type=int, default=64, help="dispatched rows of the compiled layer")
    p.add_argument(
        "--impl", default="auto", help="kernels.impl of the compiled layer (auto: scan on CPU, ragged_dot on GPU)"
    )
    a = p.parse_args()
    loaded(a.preset)
    layer(a.layer, a.rows, a.impl)


if __name__ == "__main__":
    main()
