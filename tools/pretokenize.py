"""Tokenize a corpus once into a token directory that training memory-maps (train/sources/tokens.py).

    python -m tools.pretokenize --config=configs/moe_tiny.py --out=data/tokens \\
        --config.data.source='data/*.parquet' --config.data.format=parquet \\
        --config.data.tokenizer=path/to/hf_model_dir
    python -m train.main --config=configs/moe_tiny.py --config.data.source=data/tokens \\
        --config.data.format=tokens --config.data.tokenizer=path/to/hf_model_dir

Every document of `data.source` (both splits: the token directory is split by record at training
time, with the run's data.val_percent) is tokenized with `data.tokenizer` and written in source
order; empty documents are skipped. `--out` may be a gs:// URL. Training must use the same
tokenizer (checked by its fingerprint in header.json). The last line is one JSON line: documents,
tokens, token dtype, seconds, tokens/s.
"""

from __future__ import annotations

import json
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write (local or gs://); must not hold a token directory yet.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    from train import data
    from train.sources import tokens

    cfg = _CONFIG.value.data
    if cfg.mixture:
        raise app.UsageError("tools.pretokenize writes one source: unset data.mixture (pretokenize each entry)")
    if cfg.format == "tokens":
        raise app.UsageError("data.format=tokens is already pre-tokenized")
    t0 = time.perf_counter()
    try:
        tok = data.load_tokenizer(cfg)
        corpus = data.load_corpus(cfg, None, tok)
        source = {k: cfg[k] for k in ("source", "format", "jsonl_field", "text_column")}
        header = tokens.write(
            _OUT.value, (corpus[i] for i in range(len(corpus))), tok, spec=cfg.tokenizer, source=source
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "out": _OUT.value,
                "docs": header["num_docs"],
                "tokens": header["num_tokens"],
                "dtype": header["dtype"],
                "seconds": round(seconds, 2),
                "tokens_per_s": round(header["num_tokens"] / max(seconds, 1e-9)),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
