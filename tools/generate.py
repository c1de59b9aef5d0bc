"""Generate text from a checkpoint with the compressed latent KV cache (``model/decode.py``).

  python -m tools.generate --ckpt CKPT --prompt "def fib(n):" [--prompt ...] [--tokenizer byte|tokenizer.json]
      [--max_new_tokens 128] [--temperature 0.8 --top_k 50 --top_p 0.95] [--seed 0] [--cache absorbed|naive]

CKPT: a weights-only checkpoint (``tools.convert_hf import``) or a training workdir (its newest
checkpoint under ``<workdir>/checkpoints``; the tokenizer then defaults to the run's
``data.tokenizer``). Prompts are encoded as [BOS] + text, as the training data pipeline does;
generation stops at EOS (``--no-stop`` to disable) or after max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import ml_collections
from etils import epath


def _run_tokenizer(ckpt: str) -> str:
    meta_config = epath.Path(ckpt) / "config.json"  # written by the trainer into its workdir (local or gs://)
    if (epath.Path(ckpt) / "checkpoints").is_dir() and meta_config.exists():
        return json.loads(meta_config.read_text()).get("data", {}).get("tokenizer", "byte")
    return "byte"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--tokenizer", default=None, help="byte | path to tokenizer.json (default: the run's)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="absorbed", choices=("absorbed", "naive"))
    ap.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
    args = ap.parse_args(argv)

    from model.decode import generate
    from tools.convert_hf import load_model
    from train.data import load_tokenizer

    tok = load_tokenizer(ml_collections.ConfigDict({"tokenizer": args.tokenizer or _run_tokenizer(args.ckpt)}))
    model = load_model(args.ckpt)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model {model.cfg.vocab_size}")
    prompts = [[tok.bos_id] + [int(i) for i in tok.encode(p)] for p in args.prompt]
    t0 = time.perf_counter()
    outs = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, stop_tokens=() if args.no_stop else (tok.eos_id,),
                    seed=args.seed, cache=args.cache)
    secs = time.perf_counter() - t0
    for p, o in zip(args.prompt, outs):
        print(f"--- prompt: {p!r}\n{p}{tok.decode(o)}")
    n = sum(len(o) for o in outs)
    print(f"--- {n} tokens in {secs:.2f}s (including compilation), cache={args.cache}")


if __name__ == "__main__":
    main()
