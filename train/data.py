"""Data pipeline: text files -> tokens -> packed [b, t] batches, built on grain.

Stages (train; eval drops the repeat):
  index      every document of the split is tokenized once to count its tokens ([BOS] ids [EOS]),
             and cut into chunks of at most seq_len+1 tokens that overlap by one, so every token but
             BOS is a target exactly once: the (document, offset) `ChunkIndex`. Built before the
             first batch (on several processes with an `allgather`, each counts 1/process_count).
  shuffle    one seeded global permutation of all chunks per epoch (grain's `MapDataset.shuffle`,
             a fresh order every epoch), infinite repeat. A batch draws its chunks from the whole
             split: a long document does not fill consecutive batches.
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

Files are read through `etils.epath`, so `data.source` may be a remote glob (`gs://bucket/data/*.txt`;
`**` only for local paths) and `data.tokenizer` a remote tokenizer.json.

Default corpus ("stdlib"): every `.py` file under `sysconfig.get_paths()["stdlib"]`, including the
standard library's own test suites (`test/`, `idle_test/`; ~1,800 files, ~31 MB on CPython 3.11),
excluding site-packages/dist-packages. Files are read as UTF-8 with invalid bytes replaced by
U+FFFD (a few test files are deliberately mis-encoded). No network is ever used.

Train/validation split, by file: a file goes to validation when
int(first 8 bytes of sha256(path relative to the corpus root)) mod 100 < val_percent; the root is the stdlib directory,
or for a glob the directory part before its first wildcard. So a file's split never depends on the
other files or on the working directory. One exception keeps small corpora usable: if that rule
leaves a split empty while val_percent asks for both and there are >= 2 files, the file with the
lowest (for validation) or highest (for train) hash is moved over.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from typing import Callable, Optional

import grain
import ml_collections
import numpy as np
from etils import epath

from train import paths as paths_lib
from train.chunks import ChunkIndex, Documents, assemble_rows, chunk_index
from train.tokenizer import load_tokenizer

__all__ = [
    "default_data_config",
    "load_tokenizer",
    "make_train_iterator",
    "make_eval_batches",
    "unigram_bits_per_byte",
    "check_token_ids",
    "TrainIterator",
    "load_corpus",
    "Corpus",
    "ChunkIndex",
    "chunk_index",
]

# Rows packed together by first-fit; fixed (not the batch size) so the row stream is the same for
# any batch size.
_PACKING_BINS = 64
# 2: the global chunk shuffle (1 was the document shuffle + chunk window shuffle).
_STATE_VERSION = 2
_WILDCARDS = "*?["


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` defaults; every field is documented on its line."""
    c = ml_collections.ConfigDict()
    # "stdlib" (this Python's standard-library .py sources) or a glob of files, e.g. "data/**/*.txt".
    c.source = "stdlib"
    # "text": one document per file; "jsonl": one document per non-blank line.
    c.format = "text"
    # jsonl only: the string field holding the document text.
    c.jsonl_field = "text"
    # "byte" (259 ids: 256 bytes + PAD/BOS/EOS) or a path to a Hugging Face tokenizer.json.
    c.tokenizer = "byte"
    # Tokens per row t; each packed chunk has at most seq_len inputs (needs >= 2).
    c.seq_len = 256
    # Percent of files (by stable hash of the relative path) held out for validation, 0..100.
    c.val_percent = 5
    # Seeds the per-epoch global shuffle of the chunks.
    c.seed = 0
    # Shuffle all chunks of the split (a new permutation every epoch); False keeps document order.
    c.shuffle = True
    return c


def _resolve(data_cfg) -> ml_collections.ConfigDict:
    """`data_cfg` (ConfigDict or any object with attributes) over the defaults; validated."""
    fields = default_data_config().to_dict()
    fields.update({k: getattr(data_cfg, k) for k in fields if hasattr(data_cfg, k)})
    cfg = ml_collections.ConfigDict(fields)
    _check_config(cfg)
    return cfg


def _check_config(cfg) -> None:
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise ValueError(f"data.seq_len must be an int >= 2 (one input and its target), got {cfg.seq_len!r}")
    if cfg.format not in ("text", "jsonl"):
        raise ValueError(f"data.format must be 'text' or 'jsonl', got {cfg.format!r}")
    if not 0 <= cfg.val_percent <= 100:
        raise ValueError(f"data.val_percent must be in [0, 100], got {cfg.val_percent!r}")
    if not isinstance(cfg.source, str) or not cfg.source:
        raise ValueError(f"data.source must be 'stdlib' or a non-empty glob, got {cfg.source!r}")


# ----------------------------------------------------------------------------------------------
# Corpus: the documents of one split.


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Lazily read documents. `docs[i] = (file index, byte start, byte end)`; end -1 = whole file."""

    paths: tuple[str, ...]
    docs: np.ndarray  # [n, 3] int64
    format: str
    jsonl_field: str

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        f, start, end = (int(x) for x in self.docs[i])
        with epath.Path(self.paths[f]).open("rb") as fh:
            if end < 0:
                raw = fh.read()
            else:
                fh.seek(start)
                raw = fh.read(end - start)
        if self.format == "jsonl":
            return json.loads(raw)[self.jsonl_field]
        return raw.decode("utf-8", errors="replace")


def _list_files(source: str) -> tuple[str, list[str]]:
    """(root, sorted absolute file paths) for "stdlib" or a glob."""
    if source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        paths = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
            paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
        return root, sorted(paths)
    remote = paths_lib.is_remote(source)
    pattern = source if remote else os.path.expanduser(source)
    if epath.Path(pattern).is_dir():
        raise ValueError(f"data.source={source!r} is a directory; give a glob such as {source.rstrip('/')}/*.txt")
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS)), len(parts) - 1)
    if not remote:
        root = os.path.abspath("/".join(parts[:fixed]) or ".")
        paths = sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif "**" in pattern:
        raise ValueError(
            f"data.source={source!r}: '**' globs are local only (each level costs a listing on a "
            f"remote store); use one '*' per directory level"
        )
    else:
        root = "/".join(parts[:fixed])
        paths = sorted(str(p) for p in epath.Path(root).glob("/".join(parts[fixed:])) if p.is_file())
    if not paths:
        where = "" if remote else f" (cwd {os.getcwd()})"
        raise ValueError(f"data.source={source!r}: the path/glob matched no files{where}")
    return root, paths


def _relative(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1 :] if paths_lib.is_remote(path) else os.path.relpath(path, root)


def _split_files(root: str, paths: list[str], val_percent: float) -> dict[str, list[str]]:
    """Deterministic by-file split (see module docstring)."""
    keys = [int.from_bytes(hashlib.sha256(_relative(p, root).encode()).digest()[:8], "big") for p in paths]
    is_val = [k % 100 < val_percent for k in keys]
    if len(paths) >= 2 and 0 < val_percent < 100:
        ranked = sorted(range(len(paths)), key=lambda i: (keys[i] % 100, keys[i]))
        if not any(is_val):
            is_val[ranked[0]] = True
        elif all(is_val):
            is_val[ranked[-1]] = False
    return {
        "train": [p for p, v in zip(paths, is_val) if not v],
        "validation": [p for p, v in zip(paths, is_val) if v],
    }


def _index_documents(paths: list[str], fmt: str, field: str) -> np.ndarray:
    """[n, 3] document table. jsonl files are read and validated once here, so a bad line fails at
    startup naming file and line, not hours into training."""
    docs = []
    for f, path in enumerate(paths):
        if fmt == "text":
            if epath.Path(path).stat().length > 0:
                docs.append((f, 0, -1))
            continue
        data = epath.Path(path).read_bytes()
        start = 0
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            end = start + len(line)
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}:{lineno}: JSON line has no field {field!r} (data.jsonl_field)")
                if not isinstance(record[field], str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not a string"
                    )
                if record[field]:
                    docs.append((f, start, end))
            start = end + 1
    return np.asarray(docs, np.int64).reshape(-1, 3)


def load_corpus(data_cfg, split: str) -> Corpus:
    """The documents of split "train" or "validation"."""
    data_cfg = _resolve(data_cfg)
    root, paths = _list_files(data_cfg.source)
    all_docs = _index_documents(paths, data_cfg.format, data_cfg.jsonl_field)
    if len(all_docs) == 0:
        raise ValueError(f"data.source={data_cfg.source!r}: the {len(paths)} matched file(s) contain no text")
    files = _split_files(root, paths, data_cfg.val_percent)[split]
    in_split = set(files)
    keep = np.asarray([p in in_split for p in paths], bool)
    docs = all_docs[keep[all_docs[:, 0]]]
    if len(docs) == 0:
        raise ValueError(
            f"data.source={data_cfg.source!r}: the {split} split is empty ({len(files)} of {len(paths)} files, "
            f"val_percent={data_cfg.val_percent}); add files or change data.val_percent"
        )
    return Corpus(tuple(paths), docs, data_cfg.format, data_cfg.jsonl_field)


# ----------------------------------------------------------------------------------------------
# Pipeline.


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size < 1 or process_count < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


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
    docs = Documents(load_corpus(data_cfg, split), tok)
    index = chunk_index(
        docs.lengths(process_index=process_index, process_count=process_count, allgather=allgather), data_cfg.seq_len
    )
    # One seeded permutation of all chunks per epoch (grain's index shuffle: resumable from the
    # position alone). Eval is shuffled too, with the same fixed seed, so a few eval batches sample
    # many validation documents rather than the first ones in path order.
    ds = grain.MapDataset.range(len(index))
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=data_cfg.seed)
    if train:
        ds = ds.repeat()
    # Packing needs only each chunk's length: a placeholder of that length holding the chunk id.
    ds = ds.map(lambda c: {"chunk": np.full(int(index.length[c]), c, np.int32)})
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
    t = data_cfg.seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"chunk": t}, num_packing_bins=_PACKING_BINS, shuffle_bins=False
    )
    it = it.batch(rows, drop_remainder=train)
    rows_of = dict(index=index, docs=docs, tok=tok, rows=rows, process_index=process_index, process_count=process_count)
    return it.map(lambda b: assemble_rows(b, **rows_of)), index, docs


def _fingerprint(data_cfg, global_batch_size: int, num_docs: int, num_chunks: int) -> dict:
    """What fixes the global row stream, checked on `set_state`; `num_docs` and `num_chunks` catch a
    corpus that changed under the same glob (or a different Python's stdlib)."""
    keys = ("source", "format", "jsonl_field", "tokenizer", "seq_len", "val_percent", "seed", "shuffle")
    return {
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
    ds, index, docs = _pipeline(
        data_cfg,
        "train",
        rows=global_batch_size,
        train=True,
        process_index=process_index,
        process_count=process_count,
        allgather=allgather,
    )
    return TrainIterator(ds, _fingerprint(data_cfg, global_batch_size, len(docs.corpus), len(index)), docs)


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
    ds, _, _ = _pipeline(
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
    best context-free byte model, a floor any trained model should beat."""
    corpus = load_corpus(data_cfg, "validation")
    counts = np.zeros(256, np.int64)
    for i in range(len(corpus)):
        counts += np.bincount(np.frombuffer(corpus[i].encode("utf-8"), np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
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
