"""Checkpoints: a thin layer over orbax's ``CheckpointManager``.

Each step directory holds three items::

    <dir>/<step>/state/   arrays (params, optimizer state, router biases, rng key data, step)
    <dir>/<step>/data/    JSON: the data iterator state
    <dir>/<step>/meta/    JSON: model config dict ("model"), git revision, ...

What this layer adds to orbax, and why:

* **Only committed steps count.** Orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and
  renames it when complete (local disks), or writes ``commit_success.txt`` last (GCS). A run killed
  mid-save therefore leaves a tmp dir (never listed) or a step dir without its marker. Orbax lists
  the latter as a step on local disks (e.g. a half-finished ``cp -r``), so we also require the
  marker: ``commit_success.txt`` or a commit timestamp in ``_CHECKPOINT_METADATA``.
* **Refuse the wrong model.** ``restore`` compares ``meta["model"]`` with the caller's config and
  every array's shape/dtype with ``abstract_state`` before reading arrays; the first ``save`` into a
  directory holding another model's checkpoints refuses too. Nothing is overwritten or deleted.
* **Corruption is loud.** A step that fails to read raises ``CorruptCheckpointError``; with
  ``allow_fallback`` it is renamed to ``<step>.corrupt-<time>`` (kept for inspection, invisible
  to orbax, so the resumed run can save that step again) and the next older step is tried.
* **Never clobber.** An existing committed step is never re-saved (``save`` returns False). Old
  steps are garbage-collected here, not by orbax (orbax deletes old steps even after a failed
  save), and only once a newer step is committed: the newest ``keep`` (>= 1) committed steps stay,
  and so do the steps passed to ``protect`` (the trainer protects the last good checkpoint while
  steps go non-finite). A step is unmarked (its commit marker removed) before it is deleted, so a
  run killed mid-deletion leaves an ignored directory, never a half-deleted "committed" step.
* **Checksums.** ``save`` fingerprints every array (``train/integrity.py``) and the data state
  before writing and stores them in ``meta``; ``restore`` recomputes and compares them. A flipped
  byte, a truncated file or a lost ``state/_METADATA`` is ``CorruptCheckpointError`` (which
  ``allow_fallback`` handles as above), never a silent restore nor a "different model" error.
* **Everything quarantined is not "no checkpoint".** A directory whose steps were all moved aside
  as corrupt refuses a fresh start (``restore`` raises) unless ``fresh_start_ok``.
* **Fail at the failing save.** The directory is checked writable when the ``Checkpointer`` is
  created (a read-only mount fails in a second, not in orbax's 300 s barrier). A save that fails
  in the background (disk full) raises ``CheckpointWriteError``, one line naming the step and the
  cause, at the next ``poll``/``save``/``wait``; orbax's thread tracebacks are kept off the log.
* **Readers change nothing.** ``read_only=True`` (``tools.generate``, ``tools.convert_hf``) never
  creates, deletes, renames or cleans anything: it can read the workdir of a live trainer,
  whose in-flight ``*.orbax-checkpoint-tmp`` dirs it leaves alone.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from train import integrity
from train.workdir import ensure_writable_dir

_ITEMS = ("state", "data", "meta")
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_INTEGRITY = "_integrity"  # meta key holding the checksums (stripped from what restore returns)
_QUARANTINED = re.compile(r"^\d+\.corrupt-")
_MAX_LISTED = 12  # differences named in an error message


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model (config or array shapes/dtypes)."""


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint could not be read, or its contents fail their checksums."""


class CheckpointWriteError(OSError):
    """A save failed (disk full, permissions, ...); the checkpoints committed before it are intact."""


class Checkpointer:
    """Saves every ``save_every`` steps, keeps the newest ``keep``; async by default.

    Call ``close()`` (or ``wait()``) before the process exits, or the last async save is lost
    (it then never becomes a committed step; the previous one stays the latest).
    """

    def __init__(
        self, directory, *, keep: int | None = 3, save_every: int, async_save: bool = True, read_only: bool = False
    ):
        if save_every <= 0:
            raise ValueError(f"save_every must be > 0, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(
                f"keep_checkpoints must be >= 1 (or None: keep all), got {keep}; "
                f"{keep} would delete every checkpoint, the final one too"
            )
        if "://" not in str(directory):  # local path: orbax needs it absolute
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        self.keep = keep
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such checkpoint directory")
        if not read_only:
            ensure_writable_dir(self.directory, "checkpoint directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # garbage collection is ours (_collect_garbage)
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of killed saves; never complete
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._dir_checked = False
        self._protected: set[int] = set()
        self._in_flight: int | None = None  # step of a started save not yet seen committed
        self._failed = False
        self._quiet = _OrbaxThreadErrors()
        logging.get_absl_logger().addFilter(self._quiet)

    # --- saving ---
    def save(self, step: int, state: Any, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Starts saving ``step`` if it is a multiple of ``save_every`` (or ``force``).

        Returns True if a save was started. A failure of the previous async save raises
        ``CheckpointWriteError`` here.
        """
        step = int(step)
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only")
        if not force and step % self.save_every:
            return False
        _check_json("data_state", data_state)
        _check_json("meta", meta)
        self._finish()  # the step list below must include the previous save
        committed = self._committed_steps()
        if not self._dir_checked:
            if committed:
                self._compare_model(committed[-1], self._read_meta(committed[-1]).get("model"), meta.get("model"))
            self._dir_checked = True
        if step in committed:
            logging.warning("Checkpoint step %d already exists in %s; not overwriting it.", step, self.directory)
            return False
        if committed and step < committed[-1]:
            logging.warning("Not saving step %d: %s already holds newer step %d.", step, self.directory, committed[-1])
            return False
        if step in self._mngr.all_steps():  # a dir without commit marker: stale, keep it aside
            self._quarantine(step, "incomplete")
        sums = {"state": integrity.tree_checksums(state), "data": integrity.json_checksum(data_state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, _INTEGRITY: sums}),
        )
        try:
            started = bool(self._mngr.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 -- a synchronous write failure
            raise self._write_error(step, e) from None
        if started:
            self._in_flight, self._failed = step, False
            self.poll()
        return started

    def poll(self):
        """Raises ``CheckpointWriteError`` now if the async save in flight has failed; never blocks.

        Cheap (nothing is read while a save is in progress): the trainer calls it every step so a
        failed save stops the run at once rather than at the next save.
        """
        if self._in_flight is None or self._mngr.is_saving_in_progress():
            return
        step = self._in_flight
        try:
            self._mngr.wait_until_finished()  # finished: returns at once, raising its error
        except Exception as e:  # noqa: BLE001
            raise self._write_error(step, e) from None
        if not _is_committed(self._step_dir(step)):
            raise self._write_error(step, None)
        self._in_flight = None

    def protect(self, steps):
        """Steps kept by garbage collection (besides the newest ``keep``) until the next call."""
        self._protected = {int(s) for s in steps if s is not None}

    # --- restoring ---
    def committed_steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return self._committed_steps()

    def latest_step(self) -> int | None:
        """Newest committed step, or None."""
        steps = self._committed_steps()
        return steps[-1] if steps else None

    def quarantined(self) -> list[str]:
        """Names of the step dirs moved aside as corrupt."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if _QUARANTINED.match(p.name))

    def read_meta(self, step: int) -> dict:
        """The ``meta`` dict saved with ``step`` (without the checksums)."""
        meta = self._read_meta(step)
        meta.pop(_INTEGRITY, None)
        return meta

    def restore(
        self,
        abstract_state: Any,
        *,
        expected_model: dict | None = None,
        allow_fallback: bool = False,
        fresh_start_ok: bool = False,
        only_step: int | None = None,
    ):
        """Restores the newest committed step: ``(step, state, data_state, meta)``, or None if none.
        ``only_step``: that step instead (FileNotFoundError if it is not a committed one).

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` (with ``.sharding`` to restore sharded)
        or of arrays, same structure as what was saved. ``expected_model``: the model config dict;
        None skips that check. Raises ``CheckpointMismatchError`` or ``CorruptCheckpointError``
        (also when there is no step but quarantined ones, unless ``fresh_start_ok``).
        """
        self._finish()
        self._mngr.reload()
        for s in sorted(set(self._mngr.all_steps()) - set(self._committed_steps())):
            logging.warning("Ignoring checkpoint dir %s: no commit marker (save interrupted?).", self._step_dir(s))
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        want = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in _flat_by_path(abstract).items()}
        tried, steps = [], self._committed_steps()
        if only_step is not None:
            if only_step not in steps:
                raise FileNotFoundError(f"{self.directory}: no committed checkpoint of step {only_step} (have {steps})")
            steps = [only_step]
        for step in reversed(steps):
            tried.append(step)
            try:
                meta = self._read_meta(step)
            except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
                self._on_corrupt(step, e, allow_fallback)
                continue
            sums = meta.pop(_INTEGRITY, None)
            if expected_model is not None:
                self._compare_model(step, meta.get("model"), expected_model)
            if sums is not None:  # what was saved, by the checksummed record: a real model mismatch
                self._compare_arrays(step, {p: (tuple(v[0]), np.dtype(v[1])) for p, v in sums["state"].items()}, want)
            try:
                saved = self._mngr.item_metadata(step)["state"]
                saved = {
                    p: (tuple(getattr(s, "shape", ()) or ()), getattr(s, "dtype", None))
                    for p, s in _flat_by_path(getattr(saved, "tree", saved)).items()
                }
                if sums is None:  # written before checksums: orbax's metadata is all we have
                    self._compare_arrays(step, saved, want)
                elif _array_diffs(saved, want):
                    raise CorruptCheckpointError(
                        "the array metadata (state/_METADATA) is missing or damaged: "
                        + "; ".join(_array_diffs(saved, want)[:3])
                    )
                out = self._mngr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
                )
                if sums is not None:
                    self._verify(out, sums)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001
                self._on_corrupt(step, e, allow_fallback)
                continue
            return step, out["state"], out["data"], meta
        if tried:
            raise CorruptCheckpointError(f"No restorable checkpoint in {self.directory}: tried steps {tried}.")
        if self.quarantined() and not fresh_start_ok:
            raise CorruptCheckpointError(
                f"{self.directory} holds no restorable checkpoint, only ones quarantined as corrupt "
                f"({', '.join(self.quarantined())}); refusing to start from scratch over them "
                f"(train.start_from_scratch=True does)"
            )
        return None

    def wait(self):
        """Blocks until the in-flight async save (if any) is committed, then collects garbage."""
        self._finish()

    def close(self):
        try:
            if not self._failed:
                self._finish()
        finally:
            logging.get_absl_logger().removeFilter(self._quiet)
            try:
                self._mngr.close()
            except Exception:
                if not self._failed:
                    raise

    # --- helpers ---
    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _committed_steps(self) -> list[int]:
        return sorted(s for s in self._mngr.all_steps() if _is_committed(self._step_dir(s)))

    def _read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _finish(self):
        """Waits for the save in flight, checks it committed, collects garbage (all processes)."""
        if self.read_only:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(step, e) from None
        if step is not None and not _is_committed(self._step_dir(step)):
            raise self._write_error(step, None)
        self._collect_garbage()

    def _write_error(self, step: int | None, err: Exception | None) -> CheckpointWriteError:
        self._failed = True
        cause = err if err is not None else self._quiet.last
        cause = " ".join(str(cause).split())[:400] if cause else "no commit marker was written"
        good = [s for s in self._committed_steps() if s != step]
        return CheckpointWriteError(
            f"saving checkpoint step {step} to {self.directory} failed: {cause} "
            f"(the checkpoints before it are intact; newest: {good[-1] if good else 'none'})"
        )

    def _verify(self, out: dict, sums: dict):
        bad = integrity.compare(sums["state"], integrity.tree_checksums(out["state"]))
        if integrity.json_checksum(out["data"]) != sums["data"]:
            bad.append("data state: checksum mismatch")
        if bad:
            raise CorruptCheckpointError(f"{len(bad)} item(s) fail their checksum: " + "; ".join(bad[:5]))

    def _collect_garbage(self):
        """Deletes committed steps beyond the newest ``keep`` (except protected ones), and step dirs
        without commit marker older than the newest committed step (a killed deletion's remains)."""
        committed = self._committed_steps()
        if not committed:
            return
        doomed = [] if self.keep is None else [s for s in committed[: -self.keep] if s not in self._protected]
        doomed += [s for s in self._mngr.all_steps() if s < committed[-1] and s not in committed]
        if not doomed:
            return
        if jax.process_index() == 0:
            for s in doomed:
                d = self._step_dir(s)
                for marker in (_COMMIT_FILE, _STEP_METADATA_FILE):  # uncommit first, then delete
                    (d / marker).unlink(missing_ok=True)
                d.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_gc_{committed[-1]}")
        self._mngr.reload()

    def _on_corrupt(self, step: int, err: Exception, allow_fallback: bool):
        msg = (
            f"Checkpoint step {step} in {self.directory} is corrupt or unreadable: "
            f"{type(err).__name__}: {str(err)[:2000]}"
        )
        if not allow_fallback:
            raise CorruptCheckpointError(
                msg + "\nrestore(allow_fallback=True) falls back to the previous step."
            ) from err
        logging.warning("%s\nFalling back to the previous step.", msg)
        if not self.read_only:
            self._quarantine(step, "corrupt")

    def _quarantine(self, step: int, why: str):
        """Renames a bad step dir out of orbax's view; never deletes it."""
        dst = self.directory / f"{step}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            logging.warning("Moving checkpoint %s to %s (%s).", self._step_dir(step), dst, why)
            self._step_dir(step).rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._mngr.reload()

    def _compare_model(self, step: int, saved: Any, expected: Any):
        # Only the expected fields are compared: a checkpoint may record more (execution fields).
        a, b = _flatten_dict(_json_roundtrip(saved or {})), _flatten_dict(_json_roundtrip(expected))
        diffs = [
            f"  {k}: checkpoint={a.get(k, '<absent>')!r} config={b.get(k, '<absent>')!r}"
            for k in sorted(b)
            if a.get(k, _MISSING) != b.get(k, _MISSING)
        ]
        if not diffs:
            return
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {self.directory} was written for a different model config; "
            f"differing fields:\n"
            + "\n".join(diffs[:_MAX_LISTED])
            + ("\n  ..." if len(diffs) > _MAX_LISTED else "")
            + "\nRefusing to resume from it, and this run will not overwrite it: use another "
            "workdir or the checkpoint's model config."
        )

    def _compare_arrays(self, step: int, saved: dict, want: dict):
        diffs = _array_diffs(saved, want)
        if diffs:
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} does not match the model state "
                f"({len(diffs)} arrays):\n"
                + "\n".join(f"  {d}" for d in diffs[:_MAX_LISTED])
                + ("\n  ..." if len(diffs) > _MAX_LISTED else "")
                + "\nRefusing to restore; this run will not overwrite it."
            )


class _OrbaxThreadErrors(std_logging.Filter):
    """Keeps orbax's background-thread tracebacks off the log: the failure they report is raised
    once, as ``CheckpointWriteError``, by the ``Checkpointer`` (``last`` keeps the message)."""

    def __init__(self):
        super().__init__()
        self.last = None

    def filter(self, record):
        if record.exc_info and record.levelno >= std_logging.ERROR and "orbax" in record.pathname:
            self.last = record.exc_info[1]
            return False
        return True


_MISSING = object()


def _array_diffs(saved: dict, want: dict) -> list[str]:
    """``saved``/``want``: path -> (shape, dtype or None)."""
    diffs = [f"{p}: missing from checkpoint" for p in sorted(set(want) - set(saved))]
    diffs += [f"{p}: in checkpoint but not in the model state" for p in sorted(set(saved) - set(want))]
    for p in sorted(set(want) & set(saved)):
        (w_shape, w_dtype), (s_shape, s_dtype) = want[p], saved[p]
        if w_shape != s_shape or (s_dtype is not None and np.dtype(s_dtype) != np.dtype(w_dtype)):
            diffs.append(f"{p}: checkpoint {s_shape} {s_dtype}, expected {w_shape} {w_dtype}")
    return diffs


def _is_committed(step_dir: epath.Path) -> bool:
    if (step_dir / _COMMIT_FILE).exists():
        return True
    try:
        return json.loads((step_dir / _STEP_METADATA_FILE).read_text()).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _abstract_leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _flat_by_path(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {integrity.path_str(path): leaf for path, leaf in leaves if leaf is not None}


def _flatten_dict(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix or "<root>": d}
    out = {}
    for k, v in d.items():
        out.update(_flatten_dict(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _json_roundtrip(x):
    return json.loads(json.dumps(x))


def _check_json(name: str, value: Any):
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} is not JSON-serialisable: {e}") from e
