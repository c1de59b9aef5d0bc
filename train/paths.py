"""Paths that may be remote: local files and ``gs://``, ``s3://`` ... URLs, through ``etils.epath``.

Everything the trainer, the metrics writer, the data pipeline and the tools read or write goes
through these helpers (orbax already uses ``epath``). ``epath`` sends ``gs://`` to TensorFlow's
``tf.io.gfile`` when TensorFlow is installed and to ``fsspec`` (``gcsfs``) otherwise, and local
paths to ``os``. An object store has no append and no rename of a directory, so:

* ``write_atomic`` replaces a local file by renaming a finished temporary file over it; on a remote
  store the single object upload is already all-or-nothing.
* an append-only log on a remote store is rewritten whole (``metrics.AppendLog``).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
    """True for a URL such as ``gs://bucket/run`` (anything with a ``scheme://``)."""
    return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL unchanged, a local path made absolute (``~`` expanded).

    Never ``pathlib.Path(url)``: that turns ``gs://b/run`` into a local folder ``gs:/b/run``.
    """
    path = os.fspath(path)
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def write_atomic(path: epath.Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader sees the old or the new content, never a part."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
