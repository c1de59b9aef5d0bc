"""Where a decode step's time goes: per-op times of the compiled generation loop, from a profiler trace.

  python -m tools.profile_decode [--batch 1,8] [--new 128] [--top 25] [--dtype float32]

Runs ``generation.generate_details`` on ``tools/bench_decode.py: issue_shape`` (64-token prompts,
greedy), once to compile and once under ``jax.profiler``, and sums the trace's per-op events (XLA:CPU
records one per executed op) over the run. One JSON line per op, in microseconds per decode step,
with the op's shape and the source operation it came from (its HLO ``op_name``), then one line per
group of ops (the einsum or jax function named in ``op_name``). Ops inside a ``lax.cond`` branch
count only in the steps where the branch ran; ops that ran once (outside the loop: the decode-layout
weights, made once per call) are summed in ``before_loop_ms``. Op times from the
two XLA threads overlap, so their sum can exceed the step's wall time. A ``breakdown`` line gives
the fastest decode step by category (``step_breakdown``: weight dots, YNNPACK fusions, the experts'
conditionals, copies, other kernels, and the gaps between ops), the step least disturbed on a shared
machine. Results: docs/benchmarks.md, "Generation".
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from model import decode, generation
from model import sampling as sampling_lib
from model.transformer import Transformer
from tools.bench_decode import _prompts, env, issue_shape


def op_table(hlo: str) -> dict:
    """HLO instruction name -> (shape, op_name) from an optimized module's text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), src.group(1) if src else "")
    return out


def group_of(op_name: str) -> str:
    """The einsum / jax function an op came from: 'jit(advance)/while/body/btd,dv->btv/dot_general' -> 'btd,dv->btv'."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(advance)", "while", "body", "cond"))]
    parts = [p for p in parts if not p.startswith("branch_")]
    return parts[0] if parts else "other"


def kind_of(op: str) -> str:
    """The breakdown's category of an executed op, by its HLO name: ``dot`` (XLA:CPU's dot kernels:
    the weight matvecs, and W_UK / W_UV), ``ynn_fusion`` (YNNPACK-fused kernels: the attention's
    products with the cache, a reduction), ``conditional`` (the routed experts' ``lax.switch``: their
    own time, the branches' dots excluded), ``copy``, ``other`` (every other fusion or kernel)."""
    for prefix, kind in (("dot", "dot"), ("ynn_fusion", "ynn_fusion"), ("cond", "conditional"), ("copy.", "copy")):
        if op.startswith(prefix):
            return kind
    return "other"


def step_breakdown(events: list, marker: str, kinds: dict) -> dict:
    """The fastest decode step of a trace, as microseconds by category (``kind_of``) and the gaps
    between ops (executor overhead: the step's span minus the time any op ran). Steps are cut at
    ``marker``, an op that runs once per step; the fastest step is the one least disturbed by other
    jobs on a shared machine, so its shares are load-robust where the means are not. An op nested
    in another (a conditional's branch) counts in its own category and is taken out of its parent's."""
    ev = sorted((e for e in events if e["args"]["hlo_op"] in kinds), key=lambda e: e["ts"])
    cuts = [i for i, e in enumerate(ev) if e["args"]["hlo_op"] == marker]
    span, a, b = min((ev[j]["ts"] - ev[i]["ts"], i, j) for i, j in zip(cuts, cuts[1:]))
    step = ev[a:b]
    out = collections.Counter()
    for i, e in enumerate(step):
        out[kinds[e["args"]["hlo_op"]]] += e["dur"]
        end = e["ts"] + e["dur"]
        for f in step[i + 1 :]:
            if f["ts"] >= end:
                break
            if f["tid"] == e["tid"]:  # nested in e: counted in its own category, not in e's
                out[kinds[e["args"]["hlo_op"]]] -= f["dur"]
    busy, cur = 0.0, None  # the union of the op intervals
    for s0, s1 in sorted((e["ts"], e["ts"] + e["dur"]) for e in step):
        if cur is None or s0 > cur[1]:
            busy += 0 if cur is None else cur[1] - cur[0]
            cur = [s0, s1]
        else:
            cur[1] = max(cur[1], s1)
    busy += cur[1] - cur[0]
    row = {"fastest_step_us": round(span, 1), "ops_run": len(step), "threads": len({e["tid"] for e in step})}
    row.update({f"{k}_us": round(v, 1) for k, v in sorted(out.items())})
    row["gaps_us"] = round(span - busy, 1)
    return row


def profile(model: Transformer, batch: int, new: int, top: int) -> None:
    prompts = _prompts(batch, 64, model.cfg.vocab_size)
    prepared = generation.prepare_for(model, batch)  # as a server would, once per model
    r = generation.generate_details(model, prompts, max_new_tokens=new, prepared=prepared)  # compile
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        r = generation.generate_details(model, prompts, max_new_tokens=new, prepared=prepared)
        jax.profiler.stop_trace()
        events = json.load(gzip.open(sorted(Path(d).rglob("*.trace.json.gz"))[-1]))["traceEvents"]
    # the loop's optimized HLO, for the ops' shapes and sources: advance lowered as generate_details calls it
    graphdef, state = nnx.split(model)
    t, total_len = decode.bucketed([len(p) for p in prompts], new, 16, extra=1)
    tokens, lengths = decode.right_padded(prompts, t)
    budget, stops, sampling = jnp.full((batch,), new, jnp.int32), generation.stop_array(()), sampling_lib.make(batch)
    args = (jnp.asarray(tokens), jnp.asarray(lengths), budget, stops, sampling, jax.random.key(0))
    loop = generation.start(graphdef, state, *args, total=total_len)
    hlo = generation.advance.lower(graphdef, state, loop, budget, stops, sampling, loop.step + new, prepared.weights)
    hlo = hlo.compile().as_text()
    ops = op_table(hlo)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        a = e.get("args", {})
        if e.get("ph") == "X" and a.get("hlo_module") == "jit_advance" and a.get("hlo_op") in ops:
            total[a["hlo_op"]] += e["dur"]
            count[a["hlo_op"]] += 1
    # ops that ran once ran outside the loop (decode.decode_weights; not every op carries an op_name)
    before_loop = sum(total.pop(name) for name in [n for n in total if count[n] == 1])
    steps = max(r.steps, 1)
    head = {
        "mode": "profile",
        "batch": batch,
        "steps": steps,
        "ms_per_step": round(1e3 * (r.seconds - r.ttft_s) / steps, 3),
    }
    head["ops_ms_per_step"] = round(sum(total.values()) / 1e3 / steps, 3)  # threads overlap: may exceed the wall time
    head["before_loop_ms"] = round(before_loop / 1e3, 3)
    print(json.dumps({**head, **env()}), flush=True)
    # the fastest step by category, cut at the op with the most time among those run once per step
    kinds = {n: kind_of(n) for n in count}
    marker = max((n for n in total if count[n] == steps), key=lambda n: total[n])
    loop_events = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == "jit_advance"]
    row = {"mode": "breakdown", "batch": batch, **step_breakdown(loop_events, marker, kinds)}
    print(json.dumps({**row, "load_avg": round(os.getloadavg()[0], 2)}), flush=True)
    groups = collections.Counter()
    for name, us in total.items():
        groups[group_of(ops[name][1])] += us
    for name, us in total.most_common(top):
        shape, op_name = ops[name]
        row = {"op": name, "us_per_step": round(us / steps, 1), "runs": count[name], "shape": shape, "from": op_name}
        print(json.dumps(row), flush=True)
    for g, us in groups.most_common(top):
        print(json.dumps({"group": g, "us_per_step": round(us / steps, 1), "batch": batch}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    model = Transformer(issue_shape(args.dtype), rngs=nnx.Rngs(0))
    for b in (int(x) for x in args.batch.split(",")):
        profile(model, b, args.new, args.top)


if __name__ == "__main__":
    main()
