"""Chunks: the (document, offset) index of a split, and rows assembled from packed chunk ids.

``chunk_index`` cuts every document's [BOS] ids [EOS] into chunks of at most seq_len+1 tokens that
overlap by one, so every token but BOS is a target exactly once. The pipeline (``train/data.py``)
shuffles and packs chunk *ids* by length alone; ``assemble_rows`` then reads and tokenizes only the
documents of the rows a process keeps (``Documents``: an LRU cache of tokenized documents).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from train.tokenizer import Tokenizer

# Tokens of tokenized documents kept in memory per pipeline (int32: 128 MiB).
CACHE_TOKENS = 1 << 25


@dataclasses.dataclass(frozen=True)
class ChunkIndex:
    """Chunk c = tokens [start[c], start[c] + length[c] + 1) of document doc[c]'s [BOS] ids [EOS]:
    `length[c]` (<= seq_len) inputs and as many targets; chunks of a document overlap by one token,
    so every token but BOS is a target exactly once."""

    doc: np.ndarray  # [c] int64
    start: np.ndarray  # [c] int64
    length: np.ndarray  # [c] int64

    def __len__(self) -> int:
        return len(self.doc)


def chunk_index(doc_lengths: np.ndarray, seq_len: int) -> ChunkIndex:
    """`doc_lengths[d]`: tokens of document d including BOS and EOS (>= 2)."""
    lengths = np.asarray(doc_lengths, np.int64)
    per_doc = (lengths - 1 + seq_len - 1) // seq_len  # [n] chunks per document
    doc = np.repeat(np.arange(len(lengths)), per_doc)
    first = np.cumsum(per_doc) - per_doc  # [n] index of each document's first chunk
    start = (np.arange(len(doc)) - first[doc]) * seq_len
    return ChunkIndex(doc, start, np.minimum(seq_len, lengths[doc] - 1 - start))


class Documents:
    """[BOS] ids [EOS] of each document, read and tokenized on first use (or read as stored token
    ids, for a pre-tokenized source) and kept in an LRU cache of at most `budget` tokens (a cache
    miss reads the document again)."""

    def __init__(self, corpus: Sequence[str], tok: Tokenizer, budget: int = CACHE_TOKENS):
        self.corpus, self._tok, self._budget = corpus, tok, budget
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cached_tokens = 0
        self.reads = 0  # documents read and tokenized so far (tests check sharded reading with it)

    def __call__(self, d: int) -> np.ndarray:
        d = int(d)
        ids = self._cache.get(d)
        if ids is not None:
            self._cache.move_to_end(d)
            return ids
        self.reads += 1
        stored = self.corpus.stored_tokens(d) if hasattr(self.corpus, "stored_tokens") else None
        body = self._tok.encode(self.corpus[d]) if stored is None else stored
        ids = np.concatenate([[self._tok.bos_id], body, [self._tok.eos_id]]).astype(np.int32)
        self._cache[d] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self._budget and len(self._cache) > 1:
            self._cached_tokens -= len(self._cache.popitem(last=False)[1])
        return ids

    def lengths(self, *, process_index: int, process_count: int, allgather: Optional[Callable] = None) -> np.ndarray:
        """[n] token count of every document. With `allgather` (an all-process gather of a [m] int64
        array into [process_count, m]) each process tokenizes only documents process_index::process_count."""
        n = len(self.corpus)
        stored = self.corpus.stored_lengths() if hasattr(self.corpus, "stored_lengths") else None
        if stored is not None:  # a pre-tokenized source: the counts are on disk, nothing is read
            return stored + 2
        if allgather is None or process_count == 1:
            return np.asarray([len(self(d)) for d in range(n)], np.int64)
        m = -(-n // process_count)
        local = np.full(m, -1, np.int64)
        mine = range(process_index, n, process_count)
        local[: len(mine)] = [len(self(d)) for d in mine]
        gathered = np.asarray(allgather(local)).reshape(process_count, m)  # [p, m]
        out = np.empty(n, np.int64)
        for p in range(process_count):
            out[p::process_count] = gathered[p, : len(range(p, n, process_count))]
        return out


def assemble_rows(
    packed: dict,
    *,
    index: ChunkIndex,
    docs: Documents,
    tok: Tokenizer,
    rows: int,
    process_index: int,
    process_count: int,
) -> dict:
    """Packed chunk ids of a global batch -> the documented batch layout of this process's rows,
    reading and tokenizing only the documents those rows hold."""
    chunk, seg_all, pos_all = packed["chunk"], packed["chunk_segment_ids"], packed["chunk_positions"]  # [g, t]
    mine = range(process_index, rows, process_count)
    t = chunk.shape[1]
    inputs = np.full((len(mine), t), tok.pad_id, np.int32)
    targets = np.full((len(mine), t), tok.pad_id, np.int32)
    seg = np.zeros((len(mine), t), np.int32)
    pos = np.zeros((len(mine), t), np.int32)
    for i, r in enumerate(mine):
        if r >= chunk.shape[0]:  # only the last eval batch can be short: its missing rows stay empty
            continue
        seg[i], pos[i] = seg_all[r], np.where(seg_all[r] > 0, pos_all[r], 0)
        for s in range(1, int(seg_all[r].max(initial=0)) + 1):
            (where,) = np.nonzero(seg_all[r] == s)
            c = int(chunk[r, where[0]])
            ids = docs(index.doc[c])[index.start[c] : index.start[c] + index.length[c] + 1]
            inputs[i, where], targets[i, where] = ids[:-1], ids[1:]
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": (seg > 0).astype(np.float32),
        "target_bytes": tok.token_bytes(targets).astype(np.int32),
    }
