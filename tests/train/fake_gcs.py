"""``gs://`` URLs served from memory, for tests: what ``etils.epath`` does with a bucket, offline.

Without TensorFlow, epath sends ``gs://`` to fsspec's ``gcs`` filesystem (gcsfs). ``fake_gcs()``
registers an in-memory fsspec filesystem under that name, with gcsfs's path convention
("bucket/key", no leading slash), and returns it. Every epath call on a ``gs://`` path then lands
there. (Orbax's arrays go through tensorstore's own GCS client, which this cannot reach.)
"""

from __future__ import annotations

import contextlib
from unittest import mock

from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").removeprefix("gcs://").strip("/")

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.store, self.pseudo_dirs = {}, [""]


@contextlib.contextmanager
def fake_gcs():
    fs = FakeGCS()
    with (
        mock.patch.object(backend._FileSystemSpecBackend, "_get_filesystem", lambda self, name: fs),
        mock.patch.object(gpath, "_is_tf_installed", lambda: False),
    ):
        yield fs
