"""ArrayRecord files (grain's native format): each record is one document's UTF-8 text.

Read through grain's `ArrayRecordDataSource`, one per file, opened on first use. A document is
(file, record number, -1); empty records are skipped. Files are listed through `etils.epath`; the
records themselves are read by array_record's own C++ file layer (local files; `gs://` with its own
client, as tensorstore does for orbax), not by epath.
"""

from __future__ import annotations

import numpy as np


class ArrayRecordReader:
    def __init__(self, paths: list[str]):
        self.paths = paths
        self._sources: dict[int, object] = {}

    def _source(self, f: int):
        if f not in self._sources:
            import grain

            try:
                self._sources[f] = grain.sources.ArrayRecordDataSource([self.paths[f]])
            except Exception as e:  # noqa: BLE001 -- array_record raises RuntimeError/ValueError for a bad file
                raise ValueError(
                    f"{self.paths[f]}: not a readable ArrayRecord file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                ) from None
        return self._sources[f]

    def index(self) -> np.ndarray:
        """[n, 3] (file, record, -1) of every non-empty record (each record is read once here)."""
        docs = []
        for f in range(len(self.paths)):
            src = self._source(f)
            rows = [r for r in range(len(src)) if len(src[r]) > 0]
            docs.append(np.stack([np.full(len(rows), f), np.asarray(rows, np.int64), np.full(len(rows), -1)], 1))
        return np.concatenate(docs).astype(np.int64).reshape(-1, 3) if docs else np.zeros((0, 3), np.int64)

    def text(self, f: int, record: int, _: int) -> str:
        return self._source(f)[record].decode("utf-8", errors="replace")
