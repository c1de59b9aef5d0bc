"""Data pipeline: documents -> tokens -> packed [b, t] batches, built on grain.

Sources (`train/sources/`): text/JSONL globs, Parquet, saved Hugging Face `datasets` directories,
ArrayRecord files, and token directories pre-tokenized once by `tools/pretokenize.py`; local or
remote (`gs://...`) through `etils.epath`. `data.mixture` draws from several of them by weight.

Stages (train; eval drops the repeat):
  index      every document of the split is tokenized once to count its tokens ([BOS] ids [EOS])
             (a token directory has the counts on disk), and cut into chunks of at most seq_len+1
             tokens that overlap by one, so every token but BOS is a target exactly once: the
             (document, offset) `ChunkIndex`. Built before the first batch (on several processes
             with an `allgather`, each counts 1/process_count).
  shuffle    one seeded global permutation of all chunks per epoch (grain's `MapDataset.shuffle`,
             a fresh order every epoch), infinite repeat. A batch draws its chunks from the whole
             split: a long document does not fill consecutive batches.
  mixture    (data.mixture only) each source's shuffled chunk stream (source i seeded seed + i) is
             interleaved by grain's `MapDataset.mix` in the proportions of the weights: shares of
             chunks, deterministic, resumable from the position alone.
  packing    grain first-fit packing of the chunks, by length only, into rows of length t = seq_len.
             segment_ids 1, 2, ... per packed chunk, 0 = padding. positions restart at 0 for every
             chunk (also for a chunk that continues a document), so positions < seq_len always.
  batches    `global_batch_size` rows; each process keeps rows process_index::process_count and
             reads and tokenizes only the documents of its rows (an LRU cache of `CACHE_TOKENS`
             tokens keeps the documents tokenized by the index pass and later reads; `train/chunks.py`).

Batch = dict of numpy arrays, all [b, t]:
  inputs, targets  int32; PAD where segment_ids == 0. A target is always from the same chunk
                   (hence the same document) as its input.
  segment_ids      int32, 1.. per packed chunk, 0 = padding. Attention must be block-diagonal on it.
  positions        int32, 0.. within each chunk, 0 on padding.
  loss_mask        float32, 1 where the target is real.
  target_bytes     int32, UTF-8 bytes the target token stands for (0 for BOS/EOS/PAD): the
                   denominator of bits-per-byte for any tokenizer.

Multi-process sharding: every process runs the same deterministic stream of chunk ids (cheap: no
text) and materializes only its own rows of each global batch. The union of a step's rows over
processes is exactly the 1-process batch, so the data (and so the loss) is the same whatever the
process count, and a checkpoint taken with N processes resumes with M.

Default corpus ("stdlib"): every `.py` file under `sysconfig.get_paths()["stdlib"]`, including the
standard library's own test suites (`test/`, `idle_test/`; ~1,800 files, ~31 MB on CPython 3.11),
excluding site-packages/dist-packages. Files are read as UTF-8 with invalid bytes replaced by
U+FFFD (a few test files are deliberately mis-encoded). No network is ever used.

Train/validation split (`train/sources/files.py`): by file for text/JSONL (a file goes to
validation when int(first 8 bytes of sha256(path relative to the corpus root)) mod 100 <
val_percent; the root is the stdlib directory, or for a glob the directory part before its first
wildcard), by record for the other formats (a hash of the file's key and the record number). So a
document's split never depends on the other files or on the working directory. One exception
keeps small corpora usable: if that rule leaves a split empty while val_percent asks for both and
there are >= 2 files (records), the one with the lowest (for validation) or highest (for train)
hash is moved over.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Callable, Optional

import grain
import ml_collections
import numpy as np

from train import sources
from train.chunks import ChunkIndex, Documents, assemble_rows, chunk_index
from train.sources import Corpus
from train.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "default_data_config",
    "load_tokenizer",
    "make_train_iterator",
    "make_eval_batches",
    "unigram_bits_per_byte",
    "check_token_ids",
    "TrainIterator",
    "load_corpus",
    "mixture_components",
    "Corpus",
    "ChunkIndex",
    "chunk_index",
]

# Rows packed together by first-fit; fixed (not the batch size) so the row stream is the same for
# any batch size.
_PACKING_BINS = 64
# 2: the global chunk shuffle (1 was the document shuffle + chunk window shuffle). A single source
# streams exactly as before mixtures and the other formats existed.
_STATE_VERSION = 2
# Fields a mixture entry may set; the ones it leaves out come from data.* itself.
_ENTRY_FIELDS = ("source", "format", "jsonl_field", "text_column", "weight")


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` defaults; every field is documented on its line."""
    c = ml_collections.ConfigDict()
    # "stdlib" (this Python's standard-library .py sources), a glob of files ("data/**/*.txt",
    # "gs://bucket/web/*.parquet"), or a directory (format hf_disk or tokens).
    c.source = "stdlib"
    # text | jsonl | parquet | hf_disk (datasets' save_to_disk) | arrayrecord | tokens (tools.pretokenize).
    c.format = "text"
    # jsonl only: the string field holding the document text.
    c.jsonl_field = "text"
    # parquet and hf_disk: the string column holding the document text.
    c.text_column = "text"
    # Weighted mixture replacing source/format: a tuple of dicts such as
    # dict(source="web/*.parquet", format="parquet", weight=0.7); an entry may also set jsonl_field or
    # text_column (else data.*'s). Weights are shares of the packed sequences (chunks), normalised.
    c.mixture = ()
    # "byte" (259 ids: 256 bytes + PAD/BOS/EOS), a Hugging Face tokenizer.json, or a model directory
    # holding one (BOS/EOS/PAD then come from its tokenizer_config.json / special_tokens_map.json).
    c.tokenizer = "byte"
    # Tokens per row t; each packed chunk has at most seq_len inputs (needs >= 2).
    c.seq_len = 256
    # Percent held out for validation, 0..100: of the files (text, jsonl) or of the records (other
    # formats), by a stable hash (train/sources/files.py).
    c.val_percent = 5
    # Seeds the per-epoch global shuffle of the chunks (mixture entry i uses seed + i).
    c.seed = 0
    # Shuffle all chunks of the split (a new permutation every epoch); False keeps document order.
    c.shuffle = True
    return c


def _resolve(data_cfg) -> ml_collections.ConfigDict:
    """`data_cfg` (ConfigDict or any object with attributes) over the defaults; validated."""
    fields = default_data_config().to_dict()
    fields.update({k: getattr(data_cfg, k) for k in fields if hasattr(data_cfg, k)})
    fields["mixture"] = tuple(dict(e) for e in (fields["mixture"] or ()))
    cfg = ml_collections.ConfigDict(fields)
    _check_config(cfg)
    return cfg


def _check_source(cfg, where: str) -> None:
    if cfg.format not in sources.FORMATS:
        raise ValueError(f"{where}format must be one of {', '.join(sources.FORMATS)}; got {cfg.format!r}")
    if not isinstance(cfg.source, str) or not cfg.source:
        raise ValueError(f"{where}source must be 'stdlib', a non-empty glob or a directory, got {cfg.source!r}")
    if cfg.source == "stdlib" and cfg.format != "text":
        raise ValueError(f"{where}source='stdlib' is read as text, not {cfg.format!r}")


def _check_config(cfg) -> None:
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ValueError(f"data.seq_len must be an int >= 2 (one input and its target), got {cfg.seq_len!r}")
    if not 0 <= cfg.val_percent <= 100:
        raise ValueError(f"data.val_percent must be in [0, 100], got {cfg.val_percent!r}")
    if not cfg.mixture:
        _check_source(cfg, "data.")
    for i, entry in enumerate(cfg.mixture):
        unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
        if unknown or "source" not in entry or "weight" not in entry:
            raise ValueError(
                f"data.mixture[{i}] needs 'source' and 'weight' and may set only {', '.join(_ENTRY_FIELDS)}; "
                f"got {sorted(entry)}"
            )
        w = entry["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"data.mixture[{i}].weight must be a positive number, got {w!r}")
        _check_source(ml_collections.ConfigDict({**cfg.to_dict(), **entry}), f"data.mixture[{i}].")


def mixture_components(data_cfg) -> list[tuple[ml_collections.ConfigDict, float]]:
    """[(single-source data config, weight)]: data.mixture's entries over data.*, weights normalised
    to sum 1; one (data, 1.0) without a mixture."""
    cfg = _resolve(data_cfg)
    if not cfg.mixture:
        return [(cfg, 1.0)]
    base = {**cfg.to_dict(), "mixture": ()}
    parts = [({**base, **{k: v for k, v in e.items() if k != "weight"}}, float(e["weight"])) for e in cfg.mixture]
    total = sum(w for _, w in parts)
    return [(ml_collections.ConfigDict(c), w / total) for c, w in parts]


def load_corpus(data_cfg, split: Optional[str], tok: Optional[Tokenizer] = None) -> Corpus:
    """The documents of split "train" or "validation" (None: all) of a single source (not a mixture: see
    `mixture_components`). `tok`: the run's tokenizer, checked against a pre-tokenized source (it
    is loaded from data.tokenizer when not given)."""
    cfg = _resolve(data_cfg)
    if cfg.mixture:
        raise ValueError("load_corpus reads one source; data.mixture is set (use mixture_components)")
    corpus = sources.load_corpus(cfg, split)
    if corpus.header is not None:
        tok = tok or load_tokenizer(cfg)
        sources.check_tokenizer(corpus.header, tok, cfg.source)
        corpus.reader.set_decoder(tok.decode)
    return corpus


# ----------------------------------------------------------------------------------------------
# Pipeline.


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size < 1 or process_count < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


class MixedDocuments:
    """The `Documents` of several sources behind one id space: source i's document d is
    `offsets[i] + d` (so one `ChunkIndex` and `assemble_rows` serve a mixture)."""

    def __init__(self, parts: list[Documents]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p.corpus) for p in parts])  # [s + 1]

    def __call__(self, d: int) -> np.ndarray:
        i = int(np.searchsorted(self.offsets, d, side="right")) - 1
        return self.parts[i](int(d) - int(self.offsets[i]))

    @property
    def reads(self) -> int:
        return sum(p.reads for p in self.parts)


def _pipeline(
    data_cfg,
    split: str,
    *,
    rows: int,
    train: bool,
    process_index: int,
    process_count: int,
    allgather: Optional[Callable] = None,
):
    tok = load_tokenizer(data_cfg)
    parts = []  # (Documents, ChunkIndex, weight) per source
    for cfg, weight in mixture_components(data_cfg):
        docs = Documents(load_corpus(cfg, split, tok), tok)
        lengths = docs.lengths(process_index=process_index, process_count=process_count, allgather=allgather)
        parts.append((docs, chunk_index(lengths, data_cfg.seq_len), weight))

    # One seeded permutation of each source's chunks per epoch (grain's index shuffle: resumable
    # from the position alone). Eval is shuffled too, with the same fixed seed, so a few eval
    # batches sample many validation documents rather than the first ones in path order.
    def chunk_stream(n: int, seed: int):
        ds = grain.MapDataset.range(n)
        if data_cfg.shuffle:
            ds = ds.shuffle(seed=seed)
        return ds.repeat() if train else ds

    if not data_cfg.mixture:
        ((docs, index, _),) = parts
        ds = chunk_stream(len(index), data_cfg.seed)
    else:
        # Chunk and document ids of source i are offset past those of sources < i; grain's `mix`
        # interleaves the sources' streams deterministically in the proportions of the weights
        # (a finite eval mixture ends when a source runs out).
        docs = MixedDocuments([p[0] for p in parts])
        index = ChunkIndex(
            np.concatenate([ix.doc + off for (_, ix, _), off in zip(parts, docs.offsets)]),
            np.concatenate([ix.start for _, ix, _ in parts]),
            np.concatenate([ix.length for _, ix, _ in parts]),
        )
        first = np.cumsum([0] + [len(ix) for _, ix, _ in parts])
        streams = [
            chunk_stream(len(ix), data_cfg.seed + i).map(lambda c, o=int(first[i]): c + o)
            for i, (_, ix, _) in enumerate(parts)
        ]
        ds = grain.MapDataset.mix(streams, [w for _, _, w in parts])
    # Packing needs only each chunk's length: a placeholder of that length holding the chunk id.
    ds = ds.map(lambda c: {"chunk": np.full(int(index.length[c]), c, np.int32)})
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
    t = data_cfg.seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"chunk": t}, num_packing_bins=_PACKING_BINS, shuffle_bins=False
    )
    it = it.batch(rows, drop_remainder=train)
    rows_of = dict(index=index, docs=docs, tok=tok, rows=rows, process_index=process_index, process_count=process_count)
    num_docs = sum(len(p[0].corpus) for p in parts)
    return it.map(lambda b: assemble_rows(b, **rows_of)), index, docs, num_docs


def _fingerprint(data_cfg, global_batch_size: int, num_docs: int, num_chunks: int) -> dict:
    """What fixes the global row stream, checked on `set_state`; `num_docs` and `num_chunks` catch a
    corpus that changed under the same glob (or a different Python's stdlib). A state saved before
    a key existed is checked on the keys it has."""
    keys = ("tokenizer", "seq_len", "val_percent", "seed", "shuffle")
    if data_cfg.mixture:
        source = {
            "mixture": [
                {k: c[k] for k in _ENTRY_FIELDS if k != "weight"} | {"weight": w}
                for c, w in mixture_components(data_cfg)
            ]
        }
    else:
        source = {k: data_cfg[k] for k in ("source", "format", "jsonl_field")}
        if data_cfg.format in ("parquet", "hf_disk"):
            source["text_column"] = data_cfg.text_column
    return {
        **source,
        **{k: data_cfg[k] for k in keys},
        "global_batch_size": global_batch_size,
        "num_docs": num_docs,
        "num_chunks": num_chunks,
    }


class TrainIterator:
    """Infinite iterator of batch dicts with checkpointable position.

    `get_state()` is a small JSON-serialisable dict (grain's iterator state plus a fingerprint of the
    stream's config); `set_state()` resumes so the following batches are bitwise those of an
    uninterrupted run. The state describes the global stream, so it can be restored with a
    different process count.
    """

    def __init__(self, dataset, fingerprint: dict, documents: Documents):
        self._it = iter(dataset)
        self._fingerprint = fingerprint
        self.documents = documents  # the reader (its `reads` count shows what this process read)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        state = {"version": _STATE_VERSION, "stream": self._fingerprint, "grain": self._it.get_state()}
        return json.loads(json.dumps(state))  # a detached, JSON-clean copy

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"data iterator state version {state.get('version')!r} != {_STATE_VERSION}: the "
                f"checkpoint was written by another version of the data pipeline (another order)"
            )
        diff = {k: (v, self._fingerprint.get(k)) for k, v in state["stream"].items() if self._fingerprint.get(k) != v}
        if diff:
            raise ValueError(f"data iterator state is from a different stream; (saved, now) differ in {diff}")
        self._it.set_state(state["grain"])


def make_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    allgather: Optional[Callable] = None,
) -> TrainIterator:
    """Infinite training batches of global_batch_size // process_count rows (see module docstring).

    `allgather`: gathers a [m] int64 array from every process into [process_count, m] (the trainer
    passes jax's `process_allgather`), so that the index pass is shared; without it each process
    counts the tokens of every document itself.
    """
    _check_processes(global_batch_size, process_index, process_count)
    data_cfg = _resolve(data_cfg)
    ds, index, docs, num_docs = _pipeline(
        data_cfg,
        "train",
        rows=global_batch_size,
        train=True,
        process_index=process_index,
        process_count=process_count,
        allgather=allgather,
    )
    return TrainIterator(ds, _fingerprint(data_cfg, global_batch_size, num_docs, len(index)), docs)


def make_eval_batches(
    data_cfg,
    *,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    allgather: Optional[Callable] = None,
) -> list[dict]:
    """The first `num_batches` batches of the validation split: chunks shuffled with the fixed
    `data.seed` (deterministic, and spread over many files rather than the first few).

    `batch_size` is global (each process gets batch_size // process_count rows, as in training).
    Fewer batches come back if the split runs out; the last one is then padded with empty rows
    (loss_mask 0), so every batch has the full shape.
    """
    _check_processes(batch_size, process_index, process_count)
    ds, _, _, _ = _pipeline(
        _resolve(data_cfg),
        "validation",
        rows=batch_size,
        train=False,
        process_index=process_index,
        process_count=process_count,
        allgather=allgather,
    )
    return list(itertools.islice(ds, num_batches))


def unigram_bits_per_byte(data_cfg) -> float:
    """Entropy (bits) of the validation split's byte unigram distribution: the bits/byte of the
    best context-free byte model, a floor any trained model should beat. For a mixture, of the
    sources' byte distributions mixed by their weights. A pre-tokenized source's text is its
    tokens decoded."""
    dist = np.zeros(256)
    for cfg, weight in mixture_components(data_cfg):
        corpus = load_corpus(cfg, "validation")
        counts = np.zeros(256, np.int64)
        for i in range(len(corpus)):
            counts += np.bincount(np.frombuffer(corpus[i].encode("utf-8"), np.uint8), minlength=256)
        dist += weight * counts / max(counts.sum(), 1)
    p = dist[dist > 0] / dist.sum()
    return float(-(p * np.log2(p)).sum())


def check_token_ids(batch: dict, vocab_size: int) -> None:
    """Raise if any input/target id is outside [0, vocab_size) (e.g. model vocab < tokenizer vocab)."""
    ids = np.concatenate([np.asarray(batch[k]).reshape(-1) for k in ("inputs", "targets")])
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(
            f"token id {int(ids.max())} at or above the vocabulary size {vocab_size} in the batch's inputs/targets; "
            f"the model's vocab_size must cover the tokenizer's (incl. PAD/BOS/EOS)"
        )
    if ids.size and ids.min() < 0:
        raise ValueError(f"negative token id {int(ids.min())} in the batch's inputs/targets")
