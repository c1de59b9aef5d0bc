"""Run logging: ``metrics.jsonl`` + TensorBoard + a tqdm bar, and the run's provenance files.

Files written into the workdir (process 0 only)::

    metrics.jsonl   one JSON object per ``write``: {"step": int, **metrics}
    tb/             TensorBoard event files (scalars; 1-D lists as <key>/<i>)
    config.json     the resolved experiment config
    run_info.json   git revision, package versions, devices
    summary.json    final numbers of the run

``metrics.jsonl`` is strict JSON: NaN and +-inf are written as ``null`` (``json.loads`` and
pandas read them back as None / NaN). Values are Python ints, floats, or nested lists of them.

Key conventions (train lines): loss, main_loss, mtp_loss, balance_loss, grad_norm, lr,
tokens_per_sec, mfu, skipped_steps, dropped_tokens, maxvio [n_moe_layers],
expert_load [n_moe_layers][n_experts] (fraction of assignments per expert).
Eval lines: eval_loss, eval_perplexity, eval_bits_per_byte.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
_REPO_DIR = Path(__file__).resolve().parents[1]
# Console postfix: metric key -> short label.
_POSTFIX = {"loss": "loss", "lr": "lr", "tokens_per_sec": "tok/s"}


class MetricWriter:
    """Appends metrics to JSONL and TensorBoard and drives a console progress bar.

    Only process 0 writes; on other processes every method is a no-op.
    """

    def __init__(self, workdir, *, total_steps: int, enable_tensorboard: bool = True, console: bool = True):
        self.workdir = Path(workdir)
        self._active = jax.process_index() == 0
        self._file = self._tb = self._bar = None
        if not self._active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if enable_tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / "tb"))
        if console:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, dynamic_ncols=True, unit="step", smoothing=0.1)

    def write(self, step: int, metrics: dict):
        """Records ``metrics`` at ``step`` (one device->host transfer for the whole dict)."""
        if not self._active:
            return
        values = {k: to_python(v) for k, v in jax.device_get(dict(metrics)).items()}
        line = {"step": int(step), **values}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, list):  # 1-D lists per element; nested (expert_load) only in JSONL
                    if all(isinstance(x, (int, float)) or x is None for x in v):
                        for i, x in enumerate(v):
                            self._tb.add_scalar(f"{k}/{i}", _tb_float(x), int(step))
                elif isinstance(v, (int, float)) or v is None:
                    self._tb.add_scalar(k, _tb_float(v), int(step))
            self._tb.flush()
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

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._file = self._tb = self._bar = None


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


def _tb_float(x) -> float:
    return float("nan") if x is None else float(x)


def _short(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def _dump(path: Path, obj: Any):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def write_summary(workdir, summary: dict) -> Path:
    """``<workdir>/summary.json`` (process 0)."""
    path = Path(workdir) / "summary.json"
    if jax.process_index() == 0:
        _dump(path, to_python(jax.device_get(dict(summary))))
    return path


def _git(*args, repo_dir) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_revision(repo_dir=_REPO_DIR) -> str:
    """``git rev-parse HEAD`` of the code's repo; "unknown" if it is not a git checkout."""
    return _git("rev-parse", "HEAD", repo_dir=repo_dir) or "unknown"


def git_dirty(repo_dir=_REPO_DIR) -> bool | None:
    """True if tracked files differ from HEAD; None if unknown."""
    out = _git("status", "--porcelain", "--untracked-files=no", repo_dir=repo_dir)
    return None if out is None else bool(out)


def package_versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def write_run_info(workdir, config_dict) -> dict:
    """``config.json`` (resolved config) and ``run_info.json`` (git, versions, devices)."""
    if hasattr(config_dict, "to_dict"):  # ml_collections.ConfigDict
        config_dict = config_dict.to_dict()
    info = {
        "git_revision": git_revision(),
        "git_dirty": git_dirty(),
        "packages": package_versions(),
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "process_count": jax.process_count(),
        "command": " ".join(sys.argv),
    }
    if jax.process_index() == 0:
        _dump(Path(workdir) / "config.json", config_dict)
        _dump(Path(workdir) / "run_info.json", info)
    return info
