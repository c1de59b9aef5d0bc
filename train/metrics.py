"""Run logging: ``metrics.jsonl`` + the trackers (TensorBoard, wandb: ``train/tracker.py``) + a tqdm bar
(provenance files: ``train/provenance.py``).

Files written into the workdir (process 0 only; local or remote, through ``etils.epath``)::

    metrics.jsonl             one JSON object per ``write``: {"step": int, **metrics}
    metrics.superseded.jsonl  lines a resume took out of metrics.jsonl (see below)
    tb/                       TensorBoard event files, with train.tracker=tensorboard (train/tracker.py)

**Resumes.** A run restarted from the checkpoint of step S (``start_step=S``) redoes the steps after
S, so the lines the interrupted run wrote for them are orphans: they move, in their order, to
``metrics.superseded.jsonl`` (nothing is lost) and ``metrics.jsonl`` keeps only steps <= S, so its
steps never run back in time. TensorBoard gets ``purge_step=S+1`` (its reader then drops the
orphaned events of earlier event files).

**Remote workdirs** (``gs://...``): an object store has no append, so ``metrics.jsonl`` and the
event file are uploaded whole at most every ``remote_flush_secs`` and at every ``flush()`` (the
trainer flushes before each checkpoint, so every line up to a checkpoint is stored with it).

``metrics.jsonl`` is strict JSON: NaN and +-inf are written as ``null`` (``json.loads`` and
pandas read them back as None / NaN). Values are Python ints, floats, or nested lists of them.

Key conventions (train lines): loss, main_loss, mtp_loss, balance_loss, grad_norm, lr,
tokens_per_sec, mfu, skipped_steps, dropped_tokens, maxvio [n_moe_layers],
expert_load [n_moe_layers][n_experts] (fraction of assignments per expert; on the lines of every
``train.log_expert_load_every``-th step and the last).
Eval lines: eval_loss, eval_perplexity, eval_bits_per_byte.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from train import paths as paths_lib
from train import tracker as tracker_lib

METRICS_FILE = "metrics.jsonl"
# Per-layer, per-expert metrics: [n_moe_layers][n_experts] per line (~250 KB for DeepSeek-V3), so
# written every ``train.log_expert_load_every`` steps only.
PER_LAYER_KEYS = ("expert_load",)
SUPERSEDED_FILE = "metrics.superseded.jsonl"
# Console postfix: metric key -> short label.
_POSTFIX = {"loss": "loss", "lr": "lr", "tokens_per_sec": "tok/s"}


class MetricWriter:
    """Appends metrics to JSONL, feeds the trackers (``train/tracker.py``) and drives a console bar.

    ``start_step``: the step the run starts after (0 = from scratch, S = resumed from step S);
    lines of an earlier run for later steps are superseded (module docstring); their count is
    ``self.superseded``. ``tracker``: ``train.tracker`` ("none", "tensorboard", "wandb", or several
    joined by commas); ``config`` goes to wandb. ``per_layer_every``: the per-layer, per-expert
    loads (``PER_LAYER_KEYS``) are kept on lines whose step is a multiple of it, and on the last
    step's. Only process 0 writes; on other processes every method is a no-op.
    """

    @classmethod
    def for_run(cls, workdir, train_config, *, start_step: int, config: dict) -> "MetricWriter":
        """The writer of a run from its ``config.train`` section (tracker, wandb project, per-layer
        cadence, console bar), as every trainer builds it."""
        tc = train_config
        return cls(
            workdir,
            total_steps=tc.steps,
            start_step=start_step,
            tracker=tc.tracker,
            config=config,
            wandb_project=tc.wandb_project,
            per_layer_every=tc.log_expert_load_every,
            console=tc.progress,
        )

    def __init__(
        self,
        workdir,
        *,
        total_steps: int,
        start_step: int = 0,
        tracker: str = "none",
        config: dict | None = None,
        wandb_project: str = "latentmoe",
        per_layer_every: int = 1,
        console: bool = True,
        remote_flush_secs: float = 30.0,
    ):
        self.workdir = paths_lib.resolve(workdir)
        tracker_lib.parse(tracker)  # a bad value fails on every process
        if per_layer_every < 1:
            raise ValueError(f"train.log_expert_load_every must be >= 1, got {per_layer_every}")
        self._active = jax.process_index() == 0
        self._file = self._bar = None
        self._trackers = []
        self._total, self._per_layer_every = total_steps, per_layer_every
        self.superseded = 0
        if not self._active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.superseded = supersede_after(self.workdir, start_step)
        self._file = AppendLog(self.workdir / METRICS_FILE, flush_secs=remote_flush_secs)
        self._trackers = tracker_lib.make(
            tracker,
            self.workdir,
            start_step=start_step,
            config=config,
            project=wandb_project,
            flush_secs=remote_flush_secs,
        )
        if console:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step", smoothing=0.1)

    def write(self, step: int, metrics: dict):
        """Records ``metrics`` at ``step`` (one device->host transfer for the whole dict)."""
        if not self._active:
            return
        if step % self._per_layer_every and step != self._total:
            metrics = {k: v for k, v in metrics.items() if k not in PER_LAYER_KEYS}
        values = {k: to_python(v) for k, v in jax.device_get(dict(metrics)).items()}
        line = {"step": int(step), **values}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        if self._trackers:
            tracked = tracker_lib.scalars(line)
            for t in self._trackers:
                t.log(int(step), tracked)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(int(step) - self._bar.n)
            postfix = {label: _short(values[k]) for k, label in _POSTFIX.items() if k in values}
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            evals = {k: v for k, v in values.items() if k.startswith("eval_")}
            if evals:
                self.log(f"step {step}: " + "  ".join(f"{k}={_short(v)}" for k, v in evals.items()))
            self._bar.refresh()

    def log(self, msg: str):
        """Prints a line without breaking the progress bar."""
        if not self._active:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def flush(self):
        """Stores everything written so far (on a remote workdir: uploads now)."""
        if self._file is not None:
            self._file.flush()
        for t in self._trackers:
            t.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
        for t in self._trackers:
            t.close()
        if self._bar is not None:
            self._bar.close()
        self._file = self._bar = None
        self._trackers = []


def to_python(v: Any):
    """jax/numpy scalars and arrays -> Python numbers / nested lists; non-finite floats -> None.

    Strings, bools and None pass through; other objects become ``str(v)``.
    """
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [to_python(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_python(x) for k, x in v.items()}
    a = np.asarray(v)
    if a.dtype.kind in "biu":
        return a.tolist()
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return _finite_or_none(a.astype(np.float64).tolist())
    return str(v)  # anything else (a path, an enum): kept readable rather than dropped


def _finite_or_none(x):
    if isinstance(x, list):
        return [_finite_or_none(y) for y in x]
    return x if math.isfinite(x) else None


def _short(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def supersede_after(workdir, step: int) -> int:
    """Moves the lines of ``<workdir>/metrics.jsonl`` for steps after ``step`` (and torn lines) to
    ``metrics.superseded.jsonl``, keeping their order; returns how many moved."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            later = True  # a torn last line of a killed run
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        old = epath.Path(workdir) / SUPERSEDED_FILE
        previous = old.read_text() if old.exists() else ""
        paths_lib.write_atomic(old, previous + "".join(moved))
        paths_lib.write_atomic(path, "".join(keep))
    return len(moved)


class AppendLog:
    """A text file that only grows. Local: appended and flushed line by line. Remote (no append on
    an object store): the whole text is uploaded at most every ``flush_secs`` and on ``flush()``."""

    def __init__(self, path: epath.Path, *, flush_secs: float):
        self._path, self._flush_secs = path, flush_secs
        self._remote = paths_lib.is_remote(path)
        if self._remote:
            self._text = [path.read_text()] if path.exists() else []
            self._dirty, self._last = False, time.monotonic()
            self._fh = None
        else:
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, text: str):
        if not self._remote:
            self._fh.write(text)
            self._fh.flush()
            return
        self._text.append(text)
        self._dirty = True
        if time.monotonic() - self._last >= self._flush_secs:
            self.flush()

    def flush(self):
        if self._remote and self._dirty:
            self._path.write_text("".join(self._text))
            self._dirty, self._last = False, time.monotonic()

    def close(self):
        self.flush()
        if self._fh is not None:
            self._fh.close()
