"""One trainer per workdir: an exclusive lock taken before anything is written.

``lock(workdir)`` creates the workdir if needed, checks that it is a writable directory and takes
``<workdir>/LOCK`` for the lifetime of the run (a context manager). A second trainer on the same
workdir fails at once with ``WorkdirLockedError`` naming the holder (host, pid, start time,
command); nothing of the first run is touched. Readers (``tools.generate``, ``tools.convert_hf
export``) take no lock: they open checkpoints read-only (``Checkpointer(read_only=True)``).

How the lock is held depends on where the workdir lives:

* **Local and network filesystems** (ext4, NFS, Lustre, ...): ``flock`` on ``LOCK``. The kernel
  drops it when the holder dies, SIGKILL included, so a crashed run never leaves a stale lock. On
  NFS Linux emulates ``flock`` with a byte-range lock of the NFS lock manager, which holds across
  hosts. A filesystem without lock support (``ENOLCK``, ``EOPNOTSUPP``: some FUSE or SMB mounts)
  is refused with a ``WorkdirError`` that says so, rather than running unprotected.
* **Object stores** (``gs://``, ``s3://``: paths with a scheme, through ``etils.epath``) have no
  lock primitive. ``LOCK`` is then a lease: the holder rewrites it every ``_LEASE_BEAT_S`` seconds;
  a lease fresher than ``_LEASE_TTL_S`` belongs to a live run and refuses a second one; an older
  one is taken over (its holder died; a restart after a kill waits up to ``_LEASE_TTL_S``). The
  taker writes its lease, waits, and reads it back, so two trainers started in the same instant
  do not both proceed (best effort: object stores offer no compare-and-swap through epath).

In a multi-process job only process 0 takes the lock (every process shares the workdir).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

LOCK_FILE = "LOCK"
_LEASE_TTL_S = 120.0
_LEASE_BEAT_S = 20.0
_LEASE_SETTLE_S = 2.0  # pause between writing a lease and reading it back
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirError(OSError):
    """The workdir cannot be used: not a directory, not writable, or cannot be locked."""


class WorkdirLockedError(WorkdirError):
    """Another live trainer holds the workdir."""


def _holder_record(token: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": token,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heartbeat": time.time(),
        "command": " ".join(sys.argv)[:300],
    }


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} (started {h['started']}: {h['command']!r})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (unreadable LOCK file)"


def is_remote(path) -> bool:
    return "://" in str(path)


def ensure_writable_dir(path, what: str = "workdir") -> epath.Path:
    """Creates ``path`` (parents too) and checks that a file can be written in it."""
    path = epath.Path(path)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except (FileExistsError, NotADirectoryError) as e:
        raise WorkdirError(f"{what} {path} cannot be created: a parent is a file ({e})") from None
    except OSError as e:
        raise WorkdirError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


class _FileLock:
    def __init__(self, path: epath.Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace")
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"workdir {path.parent} is in use by {_describe(holder)}; one trainer per workdir (lock: {path})"
                ) from None
            if e.errno in _NO_LOCKS:
                raise WorkdirError(
                    f"workdir {path.parent}: its filesystem does not support file locks "
                    f"({e.strerror}); refusing to run without one (use a local or NFS "
                    f"disk, or a gs:// bucket)"
                ) from None
            raise WorkdirError(f"cannot lock {path}: {e.strerror or e}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(_holder_record(uuid.uuid4().hex)).encode(), 0)
        os.fsync(self._fd)

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (removing it would race a taker)
            self._fd = None


class _LeaseLock:
    def __init__(self, path: epath.Path):
        self.path = path
        self._token = uuid.uuid4().hex
        now = time.time()
        held = self._read()
        if held and held.get("token") != self._token and now - float(held.get("heartbeat", 0)) < _LEASE_TTL_S:
            raise WorkdirLockedError(
                f"workdir {path.parent} is in use by {_describe(json.dumps(held))}, lease renewed "
                f"{now - float(held['heartbeat']):.0f} s ago; one trainer per workdir (lease: {path}; "
                f"if that run is dead, wait {_LEASE_TTL_S:.0f} s or delete the file)"
            )
        self._write()
        time.sleep(_LEASE_SETTLE_S)
        mine = self._read()
        if not mine or mine.get("token") != self._token:
            raise WorkdirLockedError(
                f"workdir {path.parent} was taken at the same time by "
                f"{_describe(json.dumps(mine or {}))}; one trainer per workdir"
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
        self._thread.start()

    def _read(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self):
        try:
            self.path.write_text(json.dumps(_holder_record(self._token)))
        except OSError as e:
            raise WorkdirError(f"cannot write the lease {self.path}: {e}") from None

    def _beat(self):
        while not self._stop.wait(_LEASE_BEAT_S):
            try:
                self._write()
            except WorkdirError:
                pass  # a transient store error; the next beat retries, the TTL has room for it

    def release(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if (self._read() or {}).get("token") == self._token:
                self.path.unlink(missing_ok=True)


class lock:
    """Exclusive hold on ``workdir`` for this process (see the module docstring)."""

    def __init__(self, workdir, *, process_index: int = 0):
        self.path = ensure_writable_dir(workdir)
        self._held = None
        if process_index == 0:
            target = self.path / LOCK_FILE
            self._held = _LeaseLock(target) if is_remote(workdir) else _FileLock(target)

    def release(self):
        if self._held is not None:
            self._held.release()
            self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
