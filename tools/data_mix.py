"""How many distinct documents each training batch draws from (``train/data.py``'s shuffle).

    python -m tools.data_mix --config=configs/moe_tiny.py [--batches=30]

Prints one JSON line: mean / min / max distinct documents per global batch over the first
``--batches`` batches. A packed piece is matched to its document by searching its first 48 bytes in
the split's text, so this needs the byte tokenizer (``data.tokenizer="byte"``).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches to inspect.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from train import data

    cfg = _CONFIG.value
    if cfg.data.tokenizer != "byte":
        raise app.UsageError("tools.data_mix matches pieces by their bytes: it needs data.tokenizer=byte")
    corpus = data.load_corpus(cfg.data, "train")
    docs = [corpus[i].encode() for i in range(len(corpus))]
    text = b"\0".join(docs)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])  # [n + 1] offset of each document in `text`
    it = data.make_train_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size)
    counts = []
    for _ in range(_BATCHES.value):
        batch, found = next(it), set()
        for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
            for s in range(1, int(seg.max(initial=0)) + 1):
                piece = bytes(int(x) for x in inputs[seg == s] if x < 256)[:48]
                pos = text.find(piece) if len(piece) >= 16 else -1  # shorter pieces are too ambiguous
                if pos >= 0:
                    found.add(int(np.searchsorted(starts, pos, side="right")) - 1)
        counts.append(len(found))
    print(
        json.dumps(
            {
                "batches": len(counts),
                "rows": cfg.train.global_batch_size,
                "distinct_docs_mean": round(float(np.mean(counts)), 2),
                "min": min(counts),
                "max": max(counts),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
