"""Pre-tokenized token directories, written once by `tools/pretokenize.py` and memory-mapped.

Layout of DIR (every file through `etils.epath`, so DIR may be remote):
  tokens.bin   all documents' token ids back to back, no BOS/EOS (the pipeline adds them),
               little-endian uint16 when the vocabulary fits in 65,536 ids, else uint32.
  docs.bin     little-endian int64 [n + 1]: document d is tokens[docs[d]:docs[d + 1]].
  header.json  {"format": "latentmoe-tokens", "version", "dtype", "num_docs", "num_tokens",
               "tokenizer": {"spec", "fingerprint", "vocab_size", "bos_id", "eos_id", "pad_id"},
               "source": the data config it was written from}. Written last: a directory
               without it is an unfinished write.
A document is (0, document number, -1); it is split by record like the other record formats.
Reading one document reads only its slice (np.memmap locally, a seek + read remotely), so each
process reads only the documents of its own rows, and the index pass reads docs.bin alone.
The tokenizer of the run must have the fingerprint in the header (`check_tokenizer`).
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
from etils import epath

from train import paths as paths_lib

MAGIC = "latentmoe-tokens"
VERSION = 1


def read_header(source: str) -> tuple[str, dict]:
    root = epath.Path(source if paths_lib.is_remote(source) else paths_lib.resolve(source))
    if not (root / "header.json").is_file():
        raise ValueError(
            f"data.source={source!r}: no header.json there, not a directory written by tools.pretokenize "
            f"(or its write did not finish)"
        )
    header = json.loads((root / "header.json").read_text())
    if header.get("format") != MAGIC or header.get("version") != VERSION:
        raise ValueError(
            f"{root / 'header.json'}: format {header.get('format')!r} v{header.get('version')!r}, "
            f"expected {MAGIC!r} v{VERSION}"
        )
    return str(root), header


class TokenReader:
    def __init__(self, root: str, header: dict):
        self.root, self.header = epath.Path(root), header
        self.paths = [str(self.root / "tokens.bin")]
        self._dtype = np.dtype(header["dtype"]).newbyteorder("<")
        self._remote = paths_lib.is_remote(root)
        offsets = self.root / "docs.bin"
        self.offsets = np.frombuffer(offsets.read_bytes(), "<i8").astype(np.int64)  # [n + 1]
        if len(self.offsets) != header["num_docs"] + 1 or self.offsets[-1] != header["num_tokens"]:
            raise ValueError(
                f"{offsets}: {len(self.offsets) - 1} documents / {self.offsets[-1]} tokens, "
                f"header.json says {header['num_docs']} / {header['num_tokens']}"
            )
        self._tokens = (
            None
            if self._remote or header["num_tokens"] == 0
            else np.memmap(self.paths[0], dtype=self._dtype, mode="r", shape=(header["num_tokens"],))
        )
        self._decode = None

    def index(self) -> np.ndarray:
        (docs,) = np.nonzero(np.diff(self.offsets) > 0)
        return np.stack([np.zeros_like(docs), docs, np.full_like(docs, -1)], 1).astype(np.int64).reshape(-1, 3)

    def token_counts(self, docs: np.ndarray) -> np.ndarray:
        """[n] tokens of the documents of a [n, 3] table (from docs.bin alone)."""
        return np.diff(self.offsets)[docs[:, 1]]

    def tokens(self, f: int, d: int, _: int) -> np.ndarray:
        start, end = int(self.offsets[d]), int(self.offsets[d + 1])
        if self._tokens is not None:
            return np.asarray(self._tokens[start:end], np.int32)
        with epath.Path(self.paths[0]).open("rb") as fh:
            fh.seek(start * self._dtype.itemsize)
            return np.frombuffer(fh.read((end - start) * self._dtype.itemsize), self._dtype).astype(np.int32)

    def set_decoder(self, decode) -> None:
        self._decode = decode

    def text(self, f: int, d: int, _: int) -> str:
        if self._decode is None:
            raise ValueError("a token directory's text needs its tokenizer (call set_decoder)")
        return self._decode(self.tokens(f, d, _))


def check_tokenizer(header: dict, tok, source: str) -> None:
    """One line if the run's tokenizer is not the one the token directory was written with."""
    want = header["tokenizer"]
    if tok.fingerprint != want["fingerprint"]:
        raise ValueError(
            f"data.source={source!r} was tokenized with {want['spec']!r} (fingerprint {want['fingerprint']}), "
            f"but data.tokenizer is another tokenizer (fingerprint {tok.fingerprint}); set data.tokenizer={want['spec']!r}"
        )


def write(out_dir, documents: Iterable[str], tok, *, spec: str, source: dict) -> dict:
    """Tokenizes `documents` (empty ones are skipped) into `out_dir`; returns the header."""
    out = paths_lib.resolve(out_dir)
    if (out / "header.json").exists():
        raise ValueError(f"{out} already holds a token directory (header.json); remove it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")
    offsets, total = [0], 0
    with (out / "tokens.bin").open("wb") as fh:
        for text in documents:
            ids = tok.encode(text)
            if len(ids) == 0:
                continue
            fh.write(ids.astype(dtype).tobytes())
            total += len(ids)
            offsets.append(total)
    (out / "docs.bin").write_bytes(np.asarray(offsets, "<i8").tobytes())
    header = {
        "format": MAGIC,
        "version": VERSION,
        "dtype": dtype.name,
        "num_docs": len(offsets) - 1,
        "num_tokens": total,
        "tokenizer": {
            "spec": spec,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "source": source,
    }
    paths_lib.write_atomic(out / "header.json", json.dumps(header, indent=1))
    return header
