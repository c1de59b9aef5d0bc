"""Experiment trackers fed by ``train/metrics.py``: the scalars of every ``metrics.jsonl`` line.

``train.tracker`` (one place resolves it: ``parse``): ``"none"`` (default: ``metrics.jsonl`` only),
``"tensorboard"`` (event files in ``<workdir>/tb``), ``"wandb"`` (Weights & Biases; imported only
then), or several joined by commas (``"tensorboard,wandb"``).

Both receive the same scalars (``scalars``): every number of a line under its key, every 1-D list
element by element as ``<key>/<i>`` (``maxvio/0`` is MoE layer 0's), ``null`` (a non-finite value)
as NaN. Nested lists (``expert_load``, layers x experts) stay in ``metrics.jsonl`` only.

**wandb.** ``WANDB_MODE=offline`` (or ``disabled``), ``WANDB_PROJECT``, ``WANDB_ENTITY`` and the
rest of wandb's environment are honoured as wandb reads them; the project defaults to
``train.wandb_project``. One workdir is one wandb run: its id is kept in ``<workdir>/wandb_run_id``
and a resume continues that run. The x axis is the metric ``step`` (``define_metric``), not wandb's
own counter, so the steps a resume redoes are logged again rather than dropped. Local files go to
``<workdir>/wandb`` (to wandb's default ``./wandb`` for a remote workdir).
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Protocol

from etils import epath

from train import paths as paths_lib

CHOICES = ("none", "tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def parse(spec: str) -> tuple[str, ...]:
    """``train.tracker`` -> the trackers to start, e.g. ``"tensorboard,wandb"`` -> both; ``"none"`` -> ()."""
    names = tuple(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    bad = [n for n in names if n not in CHOICES]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ValueError(f"train.tracker={spec!r}: expected one of {CHOICES} or several joined by commas")
    return tuple(n for n in names if n != "none")


def scalars(line: dict) -> dict[str, float]:
    """The tracked scalars of one metrics line (module docstring); ``step`` itself is left out."""
    out = {}
    for k, v in line.items():
        if k == "step" or isinstance(v, (str, dict)):
            continue
        if isinstance(v, list):
            if all(isinstance(x, (int, float)) or x is None for x in v):
                out.update({f"{k}/{i}": _float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)) or v is None:
            out[k] = _float(v)
    return out


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def make(spec: str, workdir: epath.Path, *, start_step: int, config: dict | None, project: str, flush_secs: float):
    """The trackers ``spec`` names, started for ``workdir`` (process 0 only calls this)."""
    out = []
    for name in parse(spec):
        if name == "tensorboard":
            out.append(TensorBoardTracker(workdir, start_step=start_step, flush_secs=flush_secs))
        else:
            out.append(WandbTracker(workdir, config=config, project=project))
    return out


class TensorBoardTracker:
    """tensorboardX event files in ``<workdir>/tb``; a resume from step S gives ``purge_step=S+1``."""

    def __init__(self, workdir: epath.Path, *, start_step: int, flush_secs: float):
        from tensorboardX import SummaryWriter

        logdir = workdir / "tb"
        self._remote = paths_lib.is_remote(logdir)
        if self._remote:
            _register_remote_event_files(str(logdir).split("://")[0])
        # A unique suffix: tensorboardX names files by the second, and a restart within the same
        # second would otherwise truncate the previous run's event file.
        self._tb = SummaryWriter(
            str(logdir),
            purge_step=start_step + 1,
            filename_suffix=f".{uuid.uuid4().hex[:8]}",
            flush_secs=flush_secs if self._remote else 120,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        if not self._remote:
            self._tb.flush()

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class WandbTracker:
    """A wandb run per workdir (module docstring)."""

    def __init__(self, workdir: epath.Path, *, config: dict | None, project: str):
        try:
            import wandb
        except ImportError:
            raise ValueError("train.tracker=wandb needs the wandb package: pip install wandb") from None
        id_file = workdir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # wandb ids: [a-z0-9]
            paths_lib.write_atomic(id_file, run_id + "\n")
        local = None if paths_lib.is_remote(workdir) else workdir
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or project,
            name=workdir.name,
            id=run_id,
            resume="allow",
            dir=None if local is None else str(local),
            config=config,
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log({"step": step, **values})

    def flush(self) -> None:
        pass  # wandb's service writes as it goes

    def close(self) -> None:
        self._run.finish()


class _RemoteEventFile:
    """tensorboardX record file on a remote store: the events so far, uploaded whole on ``flush``."""

    def __init__(self, path: str):
        self._path, self._buf = epath.Path(path), io.BytesIO()

    def write(self, data: bytes):
        self._buf.write(data)

    def flush(self):
        self._path.write_bytes(self._buf.getvalue())

    def close(self):
        self.flush()


class _RemoteEventFiles:
    """tensorboardX writer factory for a URL scheme, through epath (gcsfs / tf.io.gfile for gs://)."""

    def open(self, path: str):
        return _RemoteEventFile(path)

    def directory_check(self, path: str):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_remote_event_files(scheme: str):
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _RemoteEventFiles())
