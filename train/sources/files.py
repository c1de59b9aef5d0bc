"""File listing and the deterministic train/validation split shared by every source.

Split rules (each decision depends only on one file's path relative to the corpus root, and for
record formats the record's number, never on the other files or the working directory):
  by file    text, jsonl: a file goes to validation when
             int(first 8 bytes of sha256(relative path)) mod 100 < val_percent.
  by record  parquet, arrayrecord, hf_disk, tokens (one file may hold the whole corpus): record r
             of a file goes to validation when splitmix64(key(file) + r) mod 100 < val_percent,
             key(file) being the 8-byte sha256 number above.
One exception keeps small corpora usable: if the rule leaves a split empty while val_percent asks
for both and there are >= 2 units (files or records), the unit with the lowest (for validation) or
highest (for train) hash is moved over.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
from etils import epath

from train import paths as paths_lib

_WILDCARDS = "*?["


def list_files(source: str) -> tuple[str, list[str]]:
    """(root, sorted absolute file paths) of a glob; root = the directory part before the first wildcard."""
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


def relative(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1 :] if paths_lib.is_remote(path) else os.path.relpath(path, root)


def file_key(path: str, root: str) -> int:
    """The file's 64-bit split key: the first 8 bytes of sha256(path relative to root)."""
    return int.from_bytes(hashlib.sha256(relative(path, root).encode()).digest()[:8], "big")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finaliser: a bijective mix of 64-bit integers (uint64 wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def record_keys(key: int, records: np.ndarray) -> np.ndarray:
    """uint64 split keys of the given record numbers of the file whose split key is `key`."""
    with np.errstate(over="ignore"):
        return _splitmix64(np.uint64(key) + np.asarray(records).astype(np.uint64))


def validation_mask(keys: np.ndarray, val_percent: float) -> np.ndarray:
    """[n] bool: unit i goes to validation (see the module docstring, small-corpus rule included)."""
    keys = np.asarray(keys, np.uint64)
    bucket = keys % np.uint64(100)
    is_val = bucket < val_percent
    if len(keys) >= 2 and 0 < val_percent < 100:
        ranked = np.lexsort((keys, bucket))  # by bucket, then key
        if not is_val.any():
            is_val[ranked[0]] = True
        elif is_val.all():
            is_val[ranked[-1]] = False
    return is_val
