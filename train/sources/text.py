"""Text and JSONL files: one document per text file, or one per non-blank JSONL line.

A document is (file, byte start, byte end); end -1 = the whole file. Files are read as UTF-8 with
invalid bytes replaced by U+FFFD. JSONL files are read and validated once at indexing, so a bad
line fails at startup naming file and line, not hours into training.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath


class TextReader:
    def __init__(self, paths: list[str], fmt: str, field: str):
        self.paths, self.format, self.field = paths, fmt, field

    def index(self) -> np.ndarray:
        """[n, 3] (file, byte start, byte end) of every non-empty document."""
        docs = []
        for f, path in enumerate(self.paths):
            if self.format == "text":
                if epath.Path(path).stat().length > 0:
                    docs.append((f, 0, -1))
                continue
            data = epath.Path(path).read_bytes()
            start = 0
            for lineno, line in enumerate(data.split(b"\n"), start=1):
                end = start + len(line)
                if line.strip():
                    text = self._field(json_line=line, where=f"{path}:{lineno}")
                    if text:
                        docs.append((f, start, end))
                start = end + 1
        return np.asarray(docs, np.int64).reshape(-1, 3)

    def _field(self, json_line: bytes, where: str) -> str:
        try:
            record = json.loads(json_line)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or self.field not in record:
            raise ValueError(f"{where}: JSON line has no field {self.field!r} (data.jsonl_field)")
        if not isinstance(record[self.field], str):
            raise ValueError(f"{where}: field {self.field!r} is {type(record[self.field]).__name__}, not a string")
        return record[self.field]

    def text(self, f: int, start: int, end: int) -> str:
        with epath.Path(self.paths[f]).open("rb") as fh:
            if end < 0:
                raw = fh.read()
            else:
                fh.seek(start)
                raw = fh.read(end - start)
        if self.format == "jsonl":
            return json.loads(raw)[self.field]
        return raw.decode("utf-8", errors="replace")
