"""Decode throughput and cache size: absorbed latent cache vs naive expanded K/V (model/decode.py).

  python -m tools.bench_decode [--presets moe_tiny,small] [--batch 1,8] [--context 512] [--steps 32]

Prints one JSON line per (preset, batch, cache): decode tokens/s with random weights, timed over
``steps`` jitted decode steps after a prefill of ``context - steps`` tokens (compilation and
prefill excluded), at a cache of ``context`` slots. Then the cache bytes per token of
``deepseek_v3_671b`` for both caches, computed from the config (nothing allocated).
Results: docs/benchmarks.md, "Decoding".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import decode, presets
from model.transformer import Transformer


def bench(name: str, batch: int, context: int, steps: int, kind: str, model=None) -> dict:
    model = model or Transformer(presets.get(name), rngs=nnx.Rngs(0))
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    prompt = context - steps
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    key = jax.random.key(0)
    cache = decode.init_cache(cfg, batch, context, kind)
    _, nxt, cache = decode.prefill(graphdef, state, tokens, lengths, cache, key)
    pos = lengths
    _, nxt, cache = decode.decode_step(graphdef, state, nxt, pos, cache, key)  # compile
    jax.block_until_ready(nxt)
    t0 = time.perf_counter()
    for i in range(1, steps):
        _, nxt, cache = decode.decode_step(graphdef, state, nxt, pos + i, cache, key)
    jax.block_until_ready(nxt)
    secs = time.perf_counter() - t0
    n = (steps - 1) * batch
    return {"preset": name, "cache": kind, "batch": batch, "context": context, "decode_tokens_per_s": n / secs,
            "ms_per_step": 1e3 * secs / (steps - 1), "cache_bytes_per_token": decode.cache_bytes_per_token(cfg, kind),
            "backend": jax.default_backend(), "host_cpus": os.cpu_count()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="moe_tiny,small")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    for name in args.presets.split(","):
        model = Transformer(presets.get(name), rngs=nnx.Rngs(0))
        for b in (int(x) for x in args.batch.split(",")):
            for kind in decode.KINDS:
                row = bench(name, b, args.context, args.steps, kind, model)
                row["machine"] = platform.processor() or platform.machine()
                print(json.dumps(row), flush=True)
    v3 = presets.deepseek_v3_671b()
    for kind in decode.KINDS:
        per_tok = decode.cache_bytes_per_token(v3, kind)
        print(json.dumps({"preset": "deepseek_v3_671b", "cache": kind, "dtype": v3.dtype,
                          "cache_bytes_per_token": per_tok, "GiB_per_128k_token_sequence": per_tok * 131072 / 2 ** 30}))


if __name__ == "__main__":
    main()
