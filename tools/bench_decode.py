"""Generation throughput: the on-device loop, the per-token reference loop, MTP speculative decoding,
transformers' generate on the same weights, and the memory-bandwidth bound of a decode step.

  python -m tools.bench_decode table [--batch 1,8] [--new 128] [--hf] [--dtype float32] [--rounds 2]
  python -m tools.bench_decode sweep [--batch 1,8,64] [--prompt 64,1024] [--new 64] [--cache absorbed,naive]
  python -m tools.bench_decode experts [--batch 1] [--rounds 2]
  python -m tools.bench_decode acceptance --ckpt WORKDIR [--rows 32]

Model (``issue_shape``): 4 layers (1 dense), d_model 512, MLA with 8 heads, q_lora 256, kv_lora 128,
16 routed experts top-4 in 4 groups + 1 shared, vocabulary 8192, one MTP module; random weights.
``table``: 64-token prompts, ``--new`` greedy tokens, no stop token; every method once per round,
back to back (``--rounds``), compilation excluded (a warm-up call per shape first); tokens/s =
new tokens / wall time of the whole call (prefill included, as transformers' generate). ``--hf``
adds transformers' ``DeepseekV3ForCausalLM.generate`` (weights exported with ``model/hf.py``,
on cuda when there is one) and the fraction of its greedy tokens equal to ours.
``table --bandwidth``: batch 1's step against the bytes it reads: copy bandwidth, and the step's
weight matrices alone as back-to-back dots (``matvec_seconds``), independent and chained (each
dot's input the previous one's output, as in the step), with the prefill's time.
``sweep``: decode tokens/s and ms per step (prefill excluded), plain and speculative, with the
bound: bytes read per step (weights touched + cache) / measured copy bandwidth; then DeepSeek-V3's
cache bytes per token for the absorbed (c_KV + k_rope) and the naive (per-head K, V) cache.
``experts``: ms per decode step with the routed experts gathered in every step against split once
(``generation.prepare_for``), plain and speculative, alternating in one process.
``acceptance``: MTP draft acceptance of a trained run on its held-out (validation) files, greedy
and at temperature 1 (needs the training stack: grain, ml_collections; the others do not).
One JSON line per measurement, then a markdown table. Results: docs/benchmarks.md, "Generation".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import decode, generation, presets
from model import sampling as sampling_lib
from model.config import ModelConfig
from model.moe import MoE
from model.transformer import Transformer
from tools.bench_matvec import pass_seconds


def issue_shape(dtype: str = "float32") -> ModelConfig:
    """Issue #12's model: the ``small`` preset with 4 layers, a 256-wide query latent, 16 experts and
    an 8,192-token vocabulary."""
    return dataclasses.replace(
        presets.small(),
        vocab_size=8192,
        n_layers=4,
        q_lora_rank=256,
        n_routed_experts=16,
        param_dtype=dtype,
        dtype=dtype,
    )


def env() -> dict:
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "host_cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def copy_bandwidth(n_bytes: int) -> float:
    """Bytes/s of an on-device elementwise pass (reads and writes n_bytes each), best of 5. The
    input is donated: the output reuses its buffer, so no fresh pages are faulted in per call."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def step_bytes(model: Transformer, batch: int, context: int, speculative: bool) -> int:
    """Bytes one decode step must read: every weight it uses once (routed experts: the expected
    number of distinct experts m tokens touch, E (1 - (1 - k/E)^m), uniform routing), the embedding
    rows only, and each row's cache over ``context`` tokens (MTP layer too when speculative)."""
    cfg = model.cfg
    m = batch * (2 if speculative else 1)
    e, k = cfg.n_routed_experts, cfg.n_experts_per_tok
    touched = e * (1 - (1 - k / e) ** m) / e  # fraction of the routed experts read
    moe_layers = {path for path, node in nnx.iter_graph(model) if isinstance(node, MoE)}
    total = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        nbytes = v.get_value().nbytes
        if path[0] == "mtp" and not speculative:
            continue
        if path[0] == "embed":
            nbytes = m * cfg.d_model * v.get_value().dtype.itemsize
        elif path[:-1] in moe_layers and path[-1] in ("w_gate", "w_up", "w_down"):  # routed (not shared, dense)
            nbytes = int(nbytes * touched)
        total += nbytes
    layers = cfg.n_layers + (1 if speculative else 0)
    return total + batch * context * decode.cache_bytes_per_token(cfg, "absorbed") * layers // cfg.n_layers


def matvec_seconds(model: Transformer, reps: int = 20, chained: bool = False) -> float:
    """Seconds per pass of a batch-1 step's weight reads alone: one [1, in] x [in, out] f32 dot per
    matrix the plain step reads (k of the E routed experts per MoE layer, the head; no embedding
    table, no MTP), back to back in a compiled loop, best of 5 (``bench_matvec.pass_seconds``). The
    floor a step can reach with this backend's dots, before any other op; the routed experts are
    separate arrays here.

    ``chained=False``: the dots are independent (each reads the pass's input), so the runtime may
    run several at once. ``chained=True``: each dot's input depends on the previous dot's output,
    as in a decode step, where every layer reads the one before it: one dot at a time, each with
    the threads the backend gives a lone product of its size (XLA:CPU: one core below ~2 MB,
    docs/benchmarks.md, "Generation")."""
    k = model.cfg.n_experts_per_tok
    moe_layers = {path for path, node in nnx.iter_graph(model) if isinstance(node, MoE)}
    mats = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = v.get_value()
        if path[0] in ("mtp", "embed") or a.ndim < 2:
            continue
        if path[:-1] in moe_layers and path[-1] in ("w_gate", "w_up", "w_down"):
            mats += [jnp.array(a[i]) for i in range(k)]  # [d, f] / [f, d], copies
        else:  # contract the input axis: the first, or heads x v for the output projection
            mats.append(a.reshape(-1, a.shape[-1]) if path[-1] == "wo" else a.reshape(a.shape[0], -1))

    return pass_seconds(mats, reps, chained)[0]


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list:
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).tolist()


# ---- transformers on the same weights ----


def hf_generator(model: Transformer, dtype: str):
    """(generate(prompts, new) -> token lists, device name): transformers' model with our weights."""
    import tempfile

    import torch
    import transformers

    from model import hf

    transformers.logging.set_verbosity_error()  # it lists the MTP tensors it does not load
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(model, d)
        m = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval().to(device)

    def gen(prompts, new, threads=0):
        if threads:
            torch.set_num_threads(threads)
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = m.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1] :].tolist()

    return gen, device


# ---- modes ----


def table(args):
    model = Transformer(issue_shape(args.dtype), rngs=nnx.Rngs(0))
    prepared = {}  # (batch, speculative) -> generation.prepare_for: once per model, as a server does

    def new_loop(p, speculative=False):
        key = (len(p), speculative)
        if key not in prepared:
            t0 = time.perf_counter()
            prepared[key] = generation.prepare_for(model, len(p), speculative)
            jax.block_until_ready(prepared[key].weights)
            row = {"mode": "prepare", "batch": len(p), "speculative": speculative, "seconds": time.perf_counter() - t0}
            print(json.dumps({**row, "note": "once per model, compilation included"}), flush=True)
        return generation.generate(model, p, max_new_tokens=args.new, speculative=speculative, prepared=prepared[key])

    methods = {
        "new_loop": new_loop,
        "old_loop": lambda p: decode.generate_reference(model, p, max_new_tokens=args.new),
        "speculative": lambda p: new_loop(p, speculative=True),
    }
    if args.hf:
        gen, hf_device = hf_generator(model, args.dtype)
        for n in (int(x) for x in args.torch_threads.split(",")):
            methods["transformers" + (f"_threads{n}" if n else "")] = lambda p, n=n: gen(p, args.new, n)
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        prompts = _prompts(b, 64, model.cfg.vocab_size)
        outs = {name: fn(prompts) for name, fn in methods.items()}  # warm-up: compile every shape
        secs = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn(prompts)
                secs[name].append(time.perf_counter() - t0)
        for name in methods:
            same = np.mean([a == r for a, r in zip(np.ravel(outs[name]), np.ravel(outs["old_loop"]))])
            row = {
                "mode": "table",
                "method": name,
                "batch": b,
                "prompt": 64,
                "new": args.new,
                "dtype": args.dtype,
                "tokens_per_s": [round(b * args.new / s, 1) for s in secs[name]],
                "median_tokens_per_s": round(b * args.new / statistics.median(secs[name]), 1),
                "same_greedy_tokens_as_old_loop": round(float(same), 4),
                **env(),
            }
            if name.startswith("transformers"):
                row["torch_device"] = hf_device
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.bandwidth:  # batch 1, decode steps only (prefill excluded)
        bw = copy_bandwidth(args.copy_mib << 20)
        prompts = _prompts(1, 64, model.cfg.vocab_size)
        kw = dict(max_new_tokens=args.new, prepared=generation.prepare_for(model, 1))
        r = [generation.generate_details(model, prompts, **kw) for _ in range(2)][-1]
        s = (r.seconds - r.ttft_s) / r.steps
        nbytes = step_bytes(model, 1, 64 + args.new // 2, False)
        mv, chain = matvec_seconds(model), matvec_seconds(model, chained=True)
        row = {
            "mode": "bandwidth",
            "batch": 1,
            "dtype": args.dtype,
            "step_bytes": nbytes,
            "ms_per_step": round(1e3 * s, 4),
            "ttft_ms": round(1e3 * r.ttft_s, 2),  # the prefill
            "ms_per_token": round(1e3 * r.seconds / args.new, 4),  # the whole call, as the table counts
            "achieved_GBps": round(nbytes / s / 1e9, 2),
            "copy_GBps": round(bw / 1e9, 1),
            "fraction_of_copy": round(nbytes / s / bw, 4),
            "matvec_ms": round(1e3 * mv, 4),  # the step's weight reads alone, as dots (matvec_seconds)
            "matvec_GBps": round(nbytes / mv / 1e9, 2),
            "matvec_chained_ms": round(1e3 * chain, 4),  # the same dots one after another (chained=True)
            "matvec_chained_GBps": round(nbytes / chain / 1e9, 2),
            **env(),
        }
        hf = [x["median_tokens_per_s"] for x in rows if x["batch"] == 1 and x["method"].startswith("transformers")]
        if hf:  # the new loop's ratio if every op but the step's weight dots were free (the prefill as measured)
            floor_s = r.ttft_s + r.steps * mv
            row["max_ratio_vs_transformers"] = round(args.new / max(hf) / floor_s, 2)
            row["max_ratio_chained"] = round(args.new / max(hf) / (r.ttft_s + r.steps * chain), 2)
        if args.peak_gbps:
            row["fraction_of_peak"] = round(nbytes / s / 1e9 / args.peak_gbps, 4)
        print(json.dumps(row), flush=True)
    print("\n| batch | " + " | ".join(methods) + " |  (tokens/s, median of rounds)\n|---|" + "---|" * len(methods))
    for b in sorted({r["batch"] for r in rows}):
        print(f"| {b} | " + " | ".join(f"{r['median_tokens_per_s']:,.0f}" for r in rows if r["batch"] == b) + " |")


def sweep(args):
    model = Transformer(issue_shape(args.dtype), rngs=nnx.Rngs(0))
    bw = copy_bandwidth(args.copy_mib << 20)
    print(json.dumps({"mode": "copy_bandwidth", "GBps": round(bw / 1e9, 2), **env()}), flush=True)
    for t in (int(x) for x in args.prompt.split(",")):
        for b in (int(x) for x in args.batch.split(",")):
            prompts = _prompts(b, t, model.cfg.vocab_size)
            for spec, kind in [(False, c) for c in args.cache.split(",")] + [(True, "absorbed")]:
                kw = dict(max_new_tokens=args.new, speculative=spec, cache=kind)
                kw["prepared"] = generation.prepare_for(model, b, spec)
                generation.generate_details(model, prompts, **kw)  # compile
                r = generation.generate_details(model, prompts, **kw)
                decode_s = r.seconds - r.ttft_s
                n = sum(len(x) for x in r.tokens) - b  # tokens after the prefill's first
                ms_step = 1e3 * decode_s / max(r.steps, 1)
                nbytes = step_bytes(model, b, t + args.new // 2, spec)
                print(
                    json.dumps(
                        {
                            "mode": "sweep",
                            "method": "speculative" if spec else "new_loop",
                            "cache": kind,
                            "batch": b,
                            "prompt": t,
                            "new": args.new,
                            "dtype": args.dtype,
                            "decode_tokens_per_s": round(n / decode_s, 1),
                            "ms_per_step": round(ms_step, 3),
                            "ms_per_token": round(1e3 * decode_s / n * b, 3),
                            "tokens_per_step_per_row": round(n / b / max(r.steps, 1), 3),
                            "prefill_s": round(r.ttft_s, 3),
                            "step_bytes": nbytes,
                            "bound_ms_per_step": round(1e3 * nbytes / bw, 3),
                            "fraction_of_bound": round(1e3 * nbytes / bw / ms_step, 3),
                            "acceptance": round(r.accepted / r.drafted, 3) if r.drafted else None,
                            **env(),
                        }
                    ),
                    flush=True,
                )
    v3 = presets.deepseek_v3_671b()
    for kind in decode.KINDS:  # from the config, nothing allocated
        per_tok = decode.cache_bytes_per_token(v3, kind)
        print(
            json.dumps(
                {
                    "preset": "deepseek_v3_671b",
                    "cache": kind,
                    "dtype": v3.dtype,
                    "cache_bytes_per_token": per_tok,
                    "GiB_per_128k_token_sequence": per_tok * 131072 / 2**30,
                }
            )
        )


def experts(args):
    """Batch-1 decode steps with the routed experts gathered per step against split once
    (``generation.prepare_for``), alternating in one process; prefill excluded."""
    model = Transformer(issue_shape(args.dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    for spec in (False, True):
        b = int(args.batch.split(",")[0])
        prompts = _prompts(b, 64, model.cfg.vocab_size)
        t, total = decode.bucketed([64] * b, args.new, 16, extra=1)
        tokens, lengths = (jnp.asarray(a) for a in decode.right_padded(prompts, t))
        budget, stops, sampling = jnp.full((b,), args.new, jnp.int32), generation.stop_array(()), sampling_lib.make(b)
        ways = {"gathered": None, "split": generation.prepare_for(model, b, spec).weights}

        def run(weights):
            inputs = (tokens, lengths, budget, stops, sampling, jax.random.key(0))
            loop = generation.start(graphdef, state, *inputs, total=total, speculative=spec)
            jax.block_until_ready(loop)
            t0 = time.perf_counter()
            loop = generation.advance(
                graphdef, state, loop, budget, stops, sampling, loop.step + args.new, weights, speculative=spec
            )
            out = jax.device_get(loop.out.tokens)
            return 1e3 * (time.perf_counter() - t0) / int(loop.step), out

        outs = {name: run(w)[1] for name, w in ways.items()}  # compile
        ms = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, w in ways.items():
                ms[name].append(round(run(w)[0], 3))
        row = {"mode": "experts", "batch": b, "speculative": spec, "ms_per_step": ms}
        row["same_tokens"] = bool((outs["gathered"] == outs["split"]).all())
        print(json.dumps({**row, "load_avg": os.getloadavg()[0], **env()}), flush=True)


def acceptance(args):
    import ml_collections

    from tools.convert_hf import load_model
    from train.data import load_corpus, load_tokenizer

    model = load_model(args.ckpt)
    data = ml_collections.ConfigDict(json.loads(Path(args.ckpt, "config.json").read_text())["data"])
    tok, docs = load_tokenizer(data), load_corpus(data, "validation")
    rng, prompts = np.random.RandomState(0), []
    for i in rng.permutation(len(docs)):
        ids = [int(x) for x in tok.encode(docs[i])]
        if len(ids) >= args.prompt + args.new:
            at = rng.randint(0, len(ids) - args.prompt - args.new + 1)
            prompts.append([tok.bos_id] + ids[at : at + args.prompt])
        if len(prompts) == args.rows:
            break
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=args.new, temperature=temperature)
        for spec in (False, True):
            generation.generate_details(model, prompts, speculative=spec, **kw)  # compile
        runs = {False: [], True: []}
        for _ in range(args.rounds):  # back to back
            for spec in (False, True):
                runs[spec].append(generation.generate_details(model, prompts, speculative=spec, **kw))
        r = runs[True][-1]
        tps = {s: [round(sum(len(x) for x in q.tokens) / q.seconds, 1) for q in runs[s]] for s in runs}
        print(
            json.dumps(
                {
                    "mode": "acceptance",
                    "ckpt": args.ckpt,
                    "held_out_prompts": len(prompts),
                    "prompt": args.prompt + 1,
                    "new": args.new,
                    "temperature": temperature,
                    "acceptance": round(r.accepted / r.drafted, 4),
                    "drafted": r.drafted,
                    "tokens_per_verify_step": round(1 + r.accepted / r.drafted, 3),
                    "plain_tokens_per_s": tps[False],
                    "speculative_tokens_per_s": tps[True],
                    **env(),
                }
            ),
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("table", "sweep", "experts", "acceptance"))
    ap.add_argument("--batch", default=None, help="comma list (table: 1,8; sweep: 1,8,64)")
    ap.add_argument("--prompt", default="64,1024", help="sweep: prompt lengths; acceptance: one length")
    ap.add_argument("--new", type=int, default=None, help="new tokens (table 128, sweep 64, acceptance 128)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--cache", default="absorbed", help="sweep, plain decoding: absorbed and/or naive")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf", action="store_true", help="table: add transformers' generate (needs torch)")
    ap.add_argument("--torch_threads", default="0", help="table --hf: torch CPU threads, comma list (0: its default)")
    ap.add_argument("--bandwidth", action="store_true", help="table: batch-1 bytes per step vs copy bandwidth")
    ap.add_argument("--peak_gbps", type=float, default=0.0, help="the device's peak bandwidth (H200: 4800)")
    ap.add_argument("--copy_mib", type=int, default=256, help="array size of the copy-bandwidth probe")
    ap.add_argument("--ckpt", default=None, help="acceptance: a training workdir")
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args(argv)
    if args.new is not None and args.new < 1:
        ap.error(f"--new must be >= 1, got {args.new}")
    defaults = {"table": ("1,8", 128), "sweep": ("1,8,64", 64), "experts": ("1", 128), "acceptance": ("", 128)}
    defaults = defaults[args.mode]
    args.batch, args.new = args.batch or defaults[0], args.new or defaults[1]
    if args.mode == "acceptance":
        if not args.ckpt:
            ap.error("acceptance needs --ckpt WORKDIR")
        args.prompt = int(args.prompt.split(",")[0])
    {"table": table, "sweep": sweep, "experts": experts, "acceptance": acceptance}[args.mode](args)


if __name__ == "__main__":
    main()
