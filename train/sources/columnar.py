"""Parquet files and saved Hugging Face `datasets` directories: a string column holds the text.

Both are read with pyarrow (`pip install -e ".[data]"`); a record (row) is a document, null and
empty strings are skipped. A document is (file, row number in the file, row group or -1).

  parquet  data.source is a glob of .parquet files; rows are read one row group at a time (the
           last few row groups read stay cached).
  hf_disk  data.source is the directory `datasets.Dataset.save_to_disk` wrote: state.json lists its
           Arrow stream files (`_data_files`), read whole (memory-mapped when local). A
           `DatasetDict` directory (dataset_dict.json) is refused: give one split's subdirectory.
Remote paths are opened through `etils.epath` like every other file.
"""

from __future__ import annotations

import collections
import json

import numpy as np
from etils import epath

from train import paths as paths_lib

_CACHED = 4  # row groups / Arrow tables kept in memory per reader


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401 -- registers pa.compute
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            "data.format parquet/hf_disk needs pyarrow, which is not installed: pip install -e '.[data]'"
        ) from None
    return pa, pq


def hf_disk_files(source: str) -> tuple[str, list[str]]:
    """(root, Arrow file paths) of a `save_to_disk` directory."""
    root = epath.Path(source if paths_lib.is_remote(source) else paths_lib.resolve(source))
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"data.source={source!r} is a DatasetDict (splits {', '.join(splits)}); give one split's "
            f"directory, e.g. {str(root / (splits[0] if splits else 'train'))}"
        )
    if not (root / "state.json").is_file():
        raise ValueError(f"data.source={source!r}: no state.json there, not a datasets.save_to_disk directory")
    names = [d["filename"] for d in json.loads((root / "state.json").read_text()).get("_data_files", [])]
    if not names:
        raise ValueError(f"data.source={source!r}: state.json lists no data files")
    return str(root), [str(root / n) for n in names]


class ColumnarReader:
    def __init__(self, paths: list[str], fmt: str, column: str):
        self.paths, self.format, self.column = paths, fmt, column
        self._pa, self._pq = _pyarrow()
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def _open_parquet(self, f: int):
        path = self.paths[f]
        try:
            return self._pq.ParquetFile(epath.Path(path).open("rb") if paths_lib.is_remote(path) else path)
        except (self._pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None

    def _read_arrow(self, f: int):
        path = self.paths[f]
        try:
            if paths_lib.is_remote(path):
                return self._pa.ipc.open_stream(self._pa.py_buffer(epath.Path(path).read_bytes())).read_all()
            return self._pa.ipc.open_stream(self._pa.memory_map(path)).read_all()  # zero-copy
        except (self._pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Arrow stream file ({str(e).splitlines()[0][:200]})") from None

    def _check_column(self, schema, f: int) -> None:
        if self.column not in schema.names:
            raise ValueError(
                f"{self.paths[f]}: no column {self.column!r} (data.text_column); columns: {', '.join(schema.names)}"
            )
        kind = schema.field(self.column).type
        if not (self._pa.types.is_string(kind) or self._pa.types.is_large_string(kind)):
            raise ValueError(f"{self.paths[f]}: column {self.column!r} is {kind}, not a string")

    def _non_empty(self, column) -> np.ndarray:
        """Row numbers of the non-null, non-empty strings of a (chunked) column."""
        lengths = self._pa.compute.fill_null(self._pa.compute.binary_length(column), 0)
        return np.flatnonzero(np.asarray(lengths) > 0)

    def index(self) -> np.ndarray:
        """[n, 3] (file, row, row group or -1) of every non-empty document."""
        docs = []
        for f in range(len(self.paths)):
            if self.format == "parquet":
                pf = self._open_parquet(f)
                self._check_column(pf.schema_arrow, f)
                row = 0
                for g in range(pf.num_row_groups):
                    col = pf.read_row_group(g, columns=[self.column]).column(0)
                    rows = self._non_empty(col)
                    docs.append(np.stack([np.full(len(rows), f), row + rows, np.full(len(rows), g)], 1))
                    row += len(col)
            else:
                table = self._read_arrow(f)
                self._check_column(table.schema, f)
                rows = self._non_empty(table.column(self.column))
                docs.append(np.stack([np.full(len(rows), f), rows, np.full(len(rows), -1)], 1))
        return np.concatenate(docs).astype(np.int64).reshape(-1, 3) if docs else np.zeros((0, 3), np.int64)

    def _column(self, f: int, group: int):
        """(column, its first row in the file), cached."""
        key = (f, group)
        if key not in self._cache:
            if group < 0:
                self._cache[key] = (self._read_arrow(f).column(self.column), 0)
            else:
                pf = self._open_parquet(f)
                first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
                self._cache[key] = (pf.read_row_group(group, columns=[self.column]).column(0), first)
            while len(self._cache) > _CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def text(self, f: int, row: int, group: int) -> str:
        column, first = self._column(f, group)
        return column[row - first].as_py()
