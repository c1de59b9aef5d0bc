"""Generate text from a checkpoint: the compiled on-device loop (``model/generation.py``).

  python -m tools.generate --ckpt CKPT --prompt "def fib(n):" [--prompt ...] [--tokenizer byte|tokenizer.json]
      [--max_new_tokens 128] [--temperature 0.8 --top_k 50 --top_p 0.95] [--seed 0] [--cache absorbed|naive]
      [--speculative] [--stream_every 16]
  python -m tools.generate --ckpt CKPT --input requests.jsonl --output results.jsonl [--batch_size 16]

CKPT: a weights-only checkpoint (``tools.convert_hf import``) or a training workdir (its newest
checkpoint under ``<workdir>/checkpoints``, or ``--step N``'s; the tokenizer then defaults to the run's
``data.tokenizer``). Prompts are encoded as [BOS] + text, as the training data pipeline does;
generation stops at EOS (``--no-stop`` to disable) or after max_new_tokens. ``--speculative``
drafts with the model's MTP module (same greedy output, same sampling distribution; the
acceptance rate is printed). ``--stream_every N``: one prompt's text is printed every N steps.

JSONL serving: one request per line, ``{"prompt": "...", "max_new_tokens": 64, "temperature": 0.7,
"top_k": 0, "top_p": 1.0, "id": ...}`` (all but ``prompt`` optional; the command-line values are
the defaults); requests run in batches of ``--batch_size`` with per-request settings, and each
result line holds ``id``, ``prompt``, ``completion``, ``new_tokens``, ``finish_reason`` ("stop" or
"length"), and the batch's ``ttft_s`` and ``tokens_per_s``. A summary goes to stderr. The first
batch of each shape includes compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import ml_collections

_REQUEST_KEYS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "id"}


def read_requests(path: str, defaults: dict) -> list[dict]:
    """JSONL requests with the defaults filled in; a bad line is a one-line error naming it."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            raise ValueError(f'{path}:{n}: a request is an object with a string "prompt"')  # noqa: TRY004
        unknown = sorted(set(req) - _REQUEST_KEYS)
        if unknown:
            raise ValueError(f"{path}:{n}: unknown key(s) {unknown}; known: {sorted(_REQUEST_KEYS)}")
        req = {**defaults, "id": len(out), **req}
        if not isinstance(req["max_new_tokens"], int) or req["max_new_tokens"] < 0:
            raise ValueError(f"{path}:{n}: max_new_tokens must be an int >= 0, got {req['max_new_tokens']!r}")
        out.append(req)
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    ap.add_argument("--prompt", action="append", help="repeat for a batch")
    ap.add_argument("--input", help="JSONL requests (instead of --prompt)")
    ap.add_argument("--output", help="JSONL results (default: stdout)")
    ap.add_argument("--batch_size", type=int, default=16, help="JSONL: requests per batch")
    ap.add_argument("--tokenizer", default=None, help="byte | path to tokenizer.json (default: the run's)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="absorbed", choices=("absorbed", "naive"))
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    ap.add_argument("--stream_every", type=int, default=0, help="one prompt: print every N decode steps")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0:
        ap.error(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.batch_size < 1:
        ap.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if bool(args.prompt) == bool(args.input):
        ap.error("give either --prompt (repeatable) or --input requests.jsonl")
    defaults = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p")}
    requests = (
        read_requests(args.input, defaults)
        if args.input
        else [{**defaults, "id": i, "prompt": p} for i, p in enumerate(args.prompt)]
    )

    from model.generation import generate_details
    from tools.convert_hf import load_model, run_tokenizer
    from train.data import load_tokenizer

    tok = load_tokenizer(ml_collections.ConfigDict({"tokenizer": args.tokenizer or run_tokenizer(args.ckpt)}))
    model = load_model(args.ckpt, args.step)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model {model.cfg.vocab_size}")
    stops = () if args.no_stop else (tok.eos_id,)
    with open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as sink:
        totals = {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0}
        stream = args.stream_every > 0 and len(requests) == 1 and not args.input
        printed = [0]

        def on_tokens(rows):  # streaming: print the new text of the one prompt
            text = tok.decode(rows[0])
            print(text[printed[0] :], end="", flush=True)
            printed[0] = len(text)

        for i in range(0, len(requests), args.batch_size):
            batch = requests[i : i + args.batch_size]
            col = {k: [r[k] for r in batch] for k in ("max_new_tokens", "temperature", "top_k", "top_p")}
            if stream:
                print(batch[0]["prompt"], end="", flush=True)
            r = generate_details(
                model,
                [[tok.bos_id] + [int(t) for t in tok.encode(q["prompt"])] for q in batch],
                stop_tokens=stops,
                seed=args.seed + i,
                cache=args.cache,
                speculative=args.speculative,
                stream_every=args.stream_every if stream else 0,
                on_tokens=on_tokens if stream else None,
                **col,
            )
            n = sum(len(o) for o in r.tokens)
            tps = n / r.seconds if r.seconds > 0 else 0.0
            for q, o in zip(batch, r.tokens):
                finish = "stop" if o and o[-1] in stops else "length"
                if args.input:
                    sink.write(
                        json.dumps(
                            {
                                "id": q["id"],
                                "prompt": q["prompt"],
                                "completion": tok.decode(o),
                                "new_tokens": len(o),
                                "finish_reason": finish,
                                "ttft_s": round(r.ttft_s, 4),
                                "tokens_per_s": round(tps, 1),
                            }
                        )
                        + "\n"
                    )
                elif stream:
                    on_tokens([o])  # the rest of the text
                    print()
                else:
                    print(f"--- prompt: {q['prompt']!r}\n{q['prompt']}{tok.decode(o)}")
            totals["tokens"] += n
            totals["seconds"] += r.seconds
            totals["drafted"] += r.drafted
            totals["accepted"] += r.accepted
            print(
                f"--- batch of {len(batch)}: {n} tokens in {r.seconds:.2f}s ({tps:.1f} tokens/s), "
                f"time to first token {r.ttft_s:.3f}s (first batch of a shape includes compilation)",
                file=sys.stderr,
            )
    summary = f"--- {totals['tokens']} tokens in {totals['seconds']:.2f}s, cache={args.cache}"
    if args.speculative and totals["drafted"]:
        summary += f", MTP acceptance {totals['accepted'] / totals['drafted']:.1%} of {totals['drafted']} drafts"
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
