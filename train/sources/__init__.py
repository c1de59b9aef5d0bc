"""Corpora: the documents of one split of one source, read lazily (random access by document).

`data.format` picks the reader; `data.source` says where:
  text         glob of text files, one document per file            (sources/text.py)
  jsonl        glob of JSONL files, one document per non-blank line, field data.jsonl_field
  parquet      glob of Parquet files, string column data.text_column (sources/columnar.py)
  hf_disk      directory written by datasets' save_to_disk, column data.text_column
  arrayrecord  glob of ArrayRecord files, one UTF-8 document per record (sources/arrayrecord.py)
  tokens       directory written by tools/pretokenize.py               (sources/tokens.py)
Plus source "stdlib" (format text): this Python's standard-library .py files.

Every corpus is a table `docs` [n, 3] int64 of (file index, a, b), a and b as its reader defines
them, over `paths`. The train/validation split is by file for text/jsonl and by record for the
others (`sources/files.py`).
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import Optional

import numpy as np

from train.sources import files
from train.sources.arrayrecord import ArrayRecordReader
from train.sources.columnar import ColumnarReader, hf_disk_files
from train.sources.text import TextReader
from train.sources.tokens import TokenReader, check_tokenizer, read_header

FORMATS = ("text", "jsonl", "parquet", "hf_disk", "arrayrecord", "tokens")
_SPLIT_BY_FILE = ("text", "jsonl")

__all__ = ["FORMATS", "Corpus", "load_corpus", "check_tokenizer"]


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Lazily read documents: `corpus[i]` is document i's text."""

    paths: tuple[str, ...]
    docs: np.ndarray  # [n, 3] int64 (file, a, b)
    reader: object
    header: Optional[dict] = None  # the token directory's header (format "tokens")

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str:
        return self.reader.text(*(int(x) for x in self.docs[i]))

    def stored_tokens(self, i: int) -> Optional[np.ndarray]:
        """Document i's token ids when the source stores them (format "tokens"), else None."""
        if not hasattr(self.reader, "tokens"):
            return None
        return self.reader.tokens(*(int(x) for x in self.docs[i]))

    def stored_lengths(self) -> Optional[np.ndarray]:
        """[n] token counts when the source stores tokens (no document is read), else None."""
        if not hasattr(self.reader, "tokens"):
            return None
        return self.reader.token_counts(self.docs).astype(np.int64)


def _stdlib_files() -> tuple[str, list[str]]:
    """Every .py file under the stdlib directory, without site-packages/dist-packages."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [os.path.join(d, f) for f in names if f.endswith(".py")]
    return root, sorted(paths)


def _open(cfg):
    """(root, paths, reader, header) of `cfg.source` read as `cfg.format`."""
    fmt, source = cfg.format, cfg.source
    if fmt == "hf_disk":
        root, paths = hf_disk_files(source)
        return root, paths, ColumnarReader(paths, fmt, cfg.text_column), None
    if fmt == "tokens":
        root, header = read_header(source)
        reader = TokenReader(root, header)
        return root, reader.paths, reader, header
    root, paths = _stdlib_files() if source == "stdlib" else files.list_files(source)
    if fmt in ("text", "jsonl"):
        reader = TextReader(paths, fmt, cfg.jsonl_field)
    elif fmt == "parquet":
        reader = ColumnarReader(paths, fmt, cfg.text_column)
    elif fmt == "arrayrecord":
        reader = ArrayRecordReader(paths)
    else:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return root, paths, reader, None


def load_corpus(cfg, split: Optional[str]) -> Corpus:
    """The documents of split "train" or "validation" (None: all of them) of a resolved data config."""
    root, paths, reader, header = _open(cfg)
    docs = reader.index()
    if len(docs) == 0:
        raise ValueError(f"data.source={cfg.source!r}: the {len(paths)} matched file(s) contain no text")
    if split is not None:
        if cfg.format in _SPLIT_BY_FILE:
            file_val = files.validation_mask([files.file_key(p, root) for p in paths], cfg.val_percent)
            keep = file_val[docs[:, 0]] == (split == "validation")
            unit = f"{int((file_val == (split == 'validation')).sum())} of {len(paths)} files"
        else:
            keys = np.empty(len(docs), np.uint64)
            for f, path in enumerate(paths):
                rows = docs[:, 0] == f
                keys[rows] = files.record_keys(files.file_key(path, root), docs[rows, 1])
            keep = files.validation_mask(keys, cfg.val_percent) == (split == "validation")
            unit = f"{int(keep.sum())} of {len(docs)} records"
        docs = docs[keep]
        if len(docs) == 0:
            raise ValueError(
                f"data.source={cfg.source!r}: the {split} split is empty ({unit}, val_percent={cfg.val_percent}); "
                f"add data or change data.val_percent"
            )
    return Corpus(tuple(paths), docs, reader, header)
