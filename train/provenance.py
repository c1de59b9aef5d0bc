"""A run's trail in its workdir: what ran, with which code and config, and what each restart changed.

Files (process 0 writes them; local or remote workdirs, through ``etils.epath``)::

    config.json     the resolved config of the run's first start (never overwritten)
    run_info.json   the first start's git revision, package versions, devices, command, plus
                    ``resumes``: one entry per later start (the same fields, ``from_step``,
                    ``config_changes`` against the restored checkpoint's config, and
                    ``superseded_metric_lines`` taken out of metrics.jsonl)
    summary.json    the final numbers of the run

A rerun of a finished run changes none of them (``train/trainer.py``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
from etils import epath

from train import paths as paths_lib
from train.metrics import to_python

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
_REPO_DIR = Path(__file__).resolve().parents[1]
_MISSING = "<absent>"


def _dump(path: epath.Path, obj: Any):
    paths_lib.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def write_summary(workdir, summary: dict) -> epath.Path:
    """``<workdir>/summary.json`` (process 0)."""
    path = paths_lib.resolve(workdir) / "summary.json"
    if jax.process_index() == 0:
        _dump(path, to_python(jax.device_get(dict(summary))))
    return path


def read_summary(workdir) -> dict | None:
    """The run's summary.json, or None if it has none (yet)."""
    path = paths_lib.resolve(workdir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _git(*args, repo_dir) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
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


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(before: dict, after: dict) -> dict:
    """``{"optimizer.lr": [old, new], ...}``: the leaves that differ between two config dicts
    (a field only one of them has shows ``"<absent>"`` on the other side)."""
    a, b = _flatten(json.loads(json.dumps(before, default=str))), _flatten(json.loads(json.dumps(after, default=str)))
    return {
        k: [a.get(k, _MISSING), b.get(k, _MISSING)]
        for k in sorted(set(a) | set(b))
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    }


def format_changes(changes: dict) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def write_run_info(
    workdir, config_dict, *, start_step: int = 0, changes: dict | None = None, superseded_lines: int = 0
) -> dict:
    """Records this start: on the first, ``config.json`` and ``run_info.json``; on every later one,
    an entry appended to ``run_info.json["resumes"]``. Returns this start's entry."""
    if hasattr(config_dict, "to_dict"):  # ml_collections.ConfigDict
        config_dict = config_dict.to_dict()
    info = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "git_dirty": git_dirty(),
        "packages": package_versions(),
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "process_count": jax.process_count(),
        "command": " ".join(sys.argv),
    }
    if jax.process_index() != 0:
        return info
    workdir = paths_lib.resolve(workdir)
    if not (workdir / "config.json").exists():
        _dump(workdir / "config.json", config_dict)
    path = workdir / "run_info.json"
    if not path.exists():
        _dump(path, {**info, "resumes": []})
        return info
    run_info = json.loads(path.read_text())
    info.update(from_step=int(start_step), config_changes=changes or {}, superseded_metric_lines=int(superseded_lines))
    run_info.setdefault("resumes", []).append(info)
    _dump(path, run_info)
    return info
