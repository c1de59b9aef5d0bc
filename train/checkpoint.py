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
* **Never clobber.** An existing committed step is never re-saved (``save`` returns False); old
  steps are garbage-collected by orbax only after a new one is finalised.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_ITEMS = ("state", "data", "meta")
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_MAX_LISTED = 12  # differences named in an error message


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model (config or array shapes/dtypes)."""


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint could not be read."""


class Checkpointer:
    """Saves every ``save_every`` steps, keeps the newest ``keep``; async by default.

    Call ``close()`` (or ``wait()``) before the process exits, or the last async save is lost
    (it then never becomes a committed step; the previous one stays the latest).
    """

    def __init__(self, directory, *, keep: Optional[int] = 3, save_every: int, async_save: bool = True):
        if save_every <= 0:
            raise ValueError(f"save_every must be > 0, got {save_every}")
        if "://" not in str(directory):  # local path: orbax needs it absolute
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of killed saves; never complete, safe to drop
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self._dir_checked = False

    # --- saving ---
    def save(self, step: int, state: Any, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Starts saving ``step`` if it is a multiple of ``save_every`` (or ``force``).

        Returns True if a save was started. Errors of the previous async save surface here.
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        _check_json("data_state", data_state)
        _check_json("meta", meta)
        self._mngr.wait_until_finished()  # the step list below must include the previous save
        committed = self._committed_steps()
        if not self._dir_checked:
            if committed:
                self._compare_model(committed[-1], self._read_meta(committed[-1]).get("model"),
                                    meta.get("model"))
            self._dir_checked = True
        if step in committed:
            logging.warning("Checkpoint step %d already exists in %s; not overwriting it.", step, self.directory)
            return False
        if committed and step < committed[-1]:
            logging.warning("Not saving step %d: %s already holds newer step %d.", step, self.directory,
                            committed[-1])
            return False
        if step in self._mngr.all_steps():  # a dir without commit marker: stale, keep it aside
            self._quarantine(step, "incomplete")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return bool(self._mngr.save(step, args=args, force=True))

    # --- restoring ---
    def latest_step(self) -> Optional[int]:
        """Newest committed step, or None."""
        steps = self._committed_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, *, expected_model: Optional[dict] = None,
                allow_fallback: bool = False):
        """Restores the newest committed step: ``(step, state, data_state, meta)``, or None if none.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` (with ``.sharding`` to restore sharded)
        or of arrays, same structure as what was saved. ``expected_model``: the model config dict;
        None skips that check. Raises ``CheckpointMismatchError`` or ``CorruptCheckpointError``.
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()
        for s in sorted(set(self._mngr.all_steps()) - set(self._committed_steps())):
            logging.warning("Ignoring checkpoint dir %s: no commit marker (save interrupted?).",
                            self._step_dir(s))
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        tried = []
        for step in reversed(self._committed_steps()):
            tried.append(step)
            try:
                meta = self._read_meta(step)
                saved_arrays = self._mngr.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
                self._on_corrupt(step, e, allow_fallback)
                continue
            if expected_model is not None:
                self._compare_model(step, meta.get("model"), expected_model)
            self._compare_arrays(step, getattr(saved_arrays, "tree", saved_arrays), abstract)
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                self._on_corrupt(step, e, allow_fallback)
                continue
            return step, out["state"], out["data"], meta
        if tried:
            raise CorruptCheckpointError(f"No restorable checkpoint in {self.directory}: tried steps {tried}.")
        return None

    def wait(self):
        """Blocks until the in-flight async save (if any) is committed."""
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()

    # --- helpers ---
    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _committed_steps(self) -> list[int]:
        return sorted(s for s in self._mngr.all_steps() if _is_committed(self._step_dir(s)))

    def _read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _on_corrupt(self, step: int, err: Exception, allow_fallback: bool):
        msg = (f"Checkpoint step {step} in {self.directory} is corrupt or unreadable: "
               f"{type(err).__name__}: {str(err)[:2000]}")
        if not allow_fallback:
            raise CorruptCheckpointError(msg + "\nrestore(allow_fallback=True) falls back to the "
                                         "previous step.") from err
        logging.warning("%s\nFalling back to the previous step.", msg)
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
        diffs = [f"  {k}: checkpoint={a.get(k, '<absent>')!r} config={b.get(k, '<absent>')!r}"
                 for k in sorted(b) if a.get(k, _MISSING) != b.get(k, _MISSING)]
        if not diffs:
            return
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {self.directory} was written for a different model config; "
            f"differing fields:\n" + "\n".join(diffs[:_MAX_LISTED])
            + ("\n  ..." if len(diffs) > _MAX_LISTED else "")
            + "\nRefusing to resume from it, and this run will not overwrite it: use another "
              "workdir or the checkpoint's model config.")

    def _compare_arrays(self, step: int, saved_tree: Any, abstract: Any):
        saved = _flat_by_path(saved_tree)
        want = _flat_by_path(abstract)
        diffs = [f"  {p}: missing from checkpoint" for p in sorted(set(want) - set(saved))]
        diffs += [f"  {p}: in checkpoint but not in the model state" for p in sorted(set(saved) - set(want))]
        for p in sorted(set(want) & set(saved)):
            w, s = want[p], saved[p]
            s_shape, s_dtype = tuple(getattr(s, "shape", ()) or ()), getattr(s, "dtype", None)
            if tuple(w.shape) != s_shape or (s_dtype is not None and np.dtype(s_dtype) != np.dtype(w.dtype)):
                diffs.append(f"  {p}: checkpoint {s_shape} {s_dtype}, expected {tuple(w.shape)} {w.dtype}")
        if diffs:
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} does not match the model state "
                f"({len(diffs)} arrays):\n" + "\n".join(diffs[:_MAX_LISTED])
                + ("\n  ..." if len(diffs) > _MAX_LISTED else "")
                + "\nRefusing to restore; this run will not overwrite it.")


_MISSING = object()


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


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_by_path(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves if leaf is not None}


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
