"""Start-up and batch time of the data pipeline on raw text against the same corpus pre-tokenized.

    python -m tools.bench_data --config=configs/moe_tiny.py [--bpe_vocab=4096] [--repeats=2]

Builds `data.source` (default: the stdlib corpus) as a token directory once (tools.pretokenize's
writer, into a temporary directory), then alternates raw and tokens runs (A B A B ...). Each run
builds the training iterator (the index pass: raw text is read and tokenized whole, a token
directory reads docs.bin alone) and draws `--batches` batches. With `--bpe_vocab=N` a byte-level BPE
of N ids is first trained on 200 of the corpus's documents and used as the tokenizer (the byte
tokenizer costs almost nothing to run). One JSON line per run, then one for the pretokenize pass.
"""

from __future__ import annotations

import json
import tempfile
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_tiny.py", "Experiment config file.", lock_config=True)
_BPE = flags.DEFINE_integer("bpe_vocab", 0, "Train a byte-level BPE of this many ids as the tokenizer (0: config's).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs of each variant, alternated.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Batches drawn per run after start-up.")


def _train_bpe(corpus, vocab: int, path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((corpus[i] for i in range(min(200, len(corpus)))), trainer)
    tok.save(path)


def _run(cfg, batch_size: int, batches: int) -> dict:
    from train import data

    t0 = time.perf_counter()
    it = data.make_train_iterator(cfg, global_batch_size=batch_size)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return {"startup_s": round(startup, 3), "batch_ms": round(1e3 * (time.perf_counter() - t0) / batches, 2)}


def main(argv):
    del argv
    from train import data
    from train.sources import tokens

    config = _CONFIG.value
    raw = config.data.to_dict()
    as_cfg = ml_collections.ConfigDict
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    if _BPE.value:
        raw["tokenizer"] = f"{tmp}/bpe.json"
        _train_bpe(data.load_corpus(as_cfg(raw), None), _BPE.value, raw["tokenizer"])
    t0 = time.perf_counter()
    tok = data.load_tokenizer(as_cfg(raw))
    corpus = data.load_corpus(as_cfg(raw), None, tok)
    header = tokens.write(
        f"{tmp}/tokens", (corpus[i] for i in range(len(corpus))), tok, spec=raw["tokenizer"], source={}
    )
    pretokenize_s = time.perf_counter() - t0
    variants = {"raw": as_cfg(raw), "tokens": as_cfg({**raw, "source": f"{tmp}/tokens", "format": "tokens"})}
    rows = config.train.global_batch_size
    for _ in range(_REPEATS.value):
        for name, cfg in variants.items():
            line = {"variant": name, "tokenizer_vocab": tok.vocab_size, "rows": rows, "seq_len": raw["seq_len"]}
            print(json.dumps({**line, **_run(cfg, rows, _BATCHES.value)}), flush=True)
    print(
        json.dumps(
            {
                "variant": "pretokenize",
                "docs": header["num_docs"],
                "tokens": header["num_tokens"],
                "seconds": round(pretokenize_s, 2),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
