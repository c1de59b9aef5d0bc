import glob
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointError

MODEL = {"d_model": 8, "n_layers": 2, "yarn": None, "shape": (1, 2)}


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])


def _state(v: float):
    params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: jnp.full_like(p, v), params)
    return {
        "params": params,
        "step": jnp.asarray(int(v), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(v))),
    }


def _abstract():
    return jax.eval_shape(lambda: _state(0.0))


def _save(ck, step, **kw):
    kw.setdefault("meta", {"model": MODEL, "git": "abc"})
    return ck.save(step, _state(float(step)), data_state={"pos": step}, **kw)


def _steps_on_disk(d):
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_roundtrip_interval_and_force(tmp_path):
    ck = Checkpointer(tmp_path, keep=3, save_every=10)
    assert ck.restore(_abstract()) is None and ck.latest_step() is None
    assert not _save(ck, 5)
    assert _save(ck, 10)
    assert _save(ck, 13, force=True)
    ck.wait()
    assert ck.latest_step() == 13
    assert not _save(ck, 13, force=True)  # existing step: never re-saved
    step, state, data, meta = ck.restore(_abstract(), expected_model=MODEL)
    assert step == 13 and data == {"pos": 13} and meta["git"] == "abc"
    assert isinstance(state["params"], nnx.State)
    np.testing.assert_array_equal(state["params"]["layers"][1]["kernel"].get_value(), 13.0)
    np.testing.assert_array_equal(state["rng"], jax.random.key_data(jax.random.key(13)))
    assert int(state["step"]) == 13
    ck.close()


def test_keep_last_k(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, save_every=1)
    for s in (1, 2, 3, 4):
        assert _save(ck, s)
    ck.close()
    assert _steps_on_disk(tmp_path) == [3, 4]


def test_interrupted_save_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path, keep=5, save_every=10)
    _save(ck, 10)
    _save(ck, 20)
    ck.close()
    # Killed mid-save, local-disk style: a half-written tmp dir that was never renamed...
    tmp = tmp_path / "30.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "20", tmp)
    os.remove(tmp / "commit_success.txt")
    # ...and object-store / partial-copy style: a step dir without its commit marker.
    os.makedirs(tmp_path / "40")
    shutil.copytree(tmp_path / "20" / "state", tmp_path / "40" / "state")
    ck = Checkpointer(tmp_path, keep=5, save_every=10)
    assert ck.latest_step() == 20
    step, state, data, _ = ck.restore(_abstract(), expected_model=MODEL)
    assert step == 20 and data == {"pos": 20}
    # The resumed run can save those steps; the stale dir is moved aside, not deleted.
    assert _save(ck, 30) and _save(ck, 40)
    ck.wait()
    assert ck.restore(_abstract())[0] == 40
    assert [n for n in os.listdir(tmp_path) if n.startswith("40.incomplete")]
    ck.close()


def _corrupt(step_dir):
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(7)


# tensorstore's read of the corrupt file leaves an asyncio callback behind; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_raises_or_falls_back(tmp_path):
    ck = Checkpointer(tmp_path, keep=3, save_every=10)
    _save(ck, 10)
    _save(ck, 20)
    ck.close()
    _corrupt(tmp_path / "20")
    ck = Checkpointer(tmp_path, keep=3, save_every=10)
    with pytest.raises(CorruptCheckpointError, match=r"step 20 in .*" + str(tmp_path.name)):
        ck.restore(_abstract(), expected_model=MODEL)
    assert _steps_on_disk(tmp_path) == [10, 20]  # a plain restore touches nothing
    step, state, data, _ = ck.restore(_abstract(), expected_model=MODEL, allow_fallback=True)
    assert step == 10 and data == {"pos": 10}
    np.testing.assert_array_equal(state["params"]["lin"]["kernel"].get_value(), 10.0)
    assert ck.latest_step() == 10
    assert [n for n in os.listdir(tmp_path) if n.startswith("20.corrupt")]
    assert _save(ck, 20)  # the resumed run re-saves step 20 cleanly
    ck.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_corrupt_raises(tmp_path):
    ck = Checkpointer(tmp_path, save_every=1, async_save=False)
    _save(ck, 1)
    ck.close()
    _corrupt(tmp_path / "1")
    with pytest.raises(CorruptCheckpointError, match="No restorable"):
        Checkpointer(tmp_path, save_every=1).restore(_abstract(), allow_fallback=True)


def test_mismatch(tmp_path):
    ck = Checkpointer(tmp_path, save_every=1)
    _save(ck, 1)
    ck.wait()
    other = dict(MODEL, d_model=16, n_layers=3)
    with pytest.raises(CheckpointMismatchError, match="d_model") as e:
        ck.restore(_abstract(), expected_model=other)
    assert "n_layers" in str(e.value) and str(tmp_path) in str(e.value) and "not overwrite" in str(e.value)
    # Shapes/dtypes are checked too, naming the parameter path.
    bad = _abstract()
    bad["params"]["layers"][0]["kernel"] = nnx.Param(jax.ShapeDtypeStruct((8, 9), jnp.float32))
    bad["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match=r"params/layers/0/kernel") as e:
        ck.restore(bad, expected_model=MODEL)
    assert "step: checkpoint () int32" in str(e.value)
    # A new run with another model refuses to save into this directory.
    ck2 = Checkpointer(tmp_path, save_every=1)
    with pytest.raises(CheckpointMismatchError, match="will not overwrite"):
        ck2.save(2, _state(2.0), data_state={}, meta={"model": other})
    ck.close()
    ck2.close()
    assert _steps_on_disk(tmp_path) == [1]


def test_failed_save_keeps_good_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, save_every=1)
    _save(ck, 1)
    _save(ck, 2)
    with pytest.raises(TypeError, match="data_state"):
        ck.save(3, _state(3.0), data_state={"it": object()}, meta={"model": MODEL})
    with pytest.raises(Exception):
        ck.save(3, {"x": object()}, data_state={}, meta={"model": MODEL})
        ck.wait()
    assert _steps_on_disk(tmp_path) == [1, 2]
    assert ck.restore(_abstract(), expected_model=MODEL)[0] == 2
    assert _save(ck, 3)  # the failed attempt's leftovers do not block a retry
    ck.close()
    assert _steps_on_disk(tmp_path) == [2, 3]


# ---- issue 11: safety ----


def test_keep_below_one_is_refused(tmp_path):
    for keep in (0, -1):  # orbax's max_to_keep=0 deleted every checkpoint, the final one too
        with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
            Checkpointer(tmp_path, keep=keep, save_every=1)


def _random_state(seed: int):
    """Incompressible values: zstd stores them nearly verbatim, so a flip decodes without error."""
    return {"w": jax.random.normal(jax.random.key(seed), (64, 64))}


def _flip_bytes(step_dir, n=64):
    f = max(glob.glob(str(step_dir / "state" / "ocdbt.process_*" / "d" / "*")), key=os.path.getsize)  # array data
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(bytes([0xA5] * n))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_fail_their_checksum(tmp_path):
    ck = Checkpointer(tmp_path, keep=3, save_every=10, async_save=False)
    for s in (10, 20):
        ck.save(s, _random_state(20 - s), data_state={"pos": s}, meta={"model": MODEL})
    ck.close()
    _flip_bytes(tmp_path / "20")  # orbax alone restores this silently (values like 6e37)
    abstract = jax.eval_shape(lambda: _random_state(0))
    ck = Checkpointer(tmp_path, keep=3, save_every=10)
    with pytest.raises(CorruptCheckpointError, match=r"step 20 .*fail their checksum: w: "):
        ck.restore(abstract, expected_model=MODEL)
    step, state, data, _ = ck.restore(abstract, expected_model=MODEL, allow_fallback=True)
    assert step == 10 and data == {"pos": 10}
    np.testing.assert_array_equal(state["w"], _random_state(10)["w"])
    assert [n for n in os.listdir(tmp_path) if n.startswith("20.corrupt")]
    ck.close()


def test_lost_array_metadata_is_corruption_not_a_model_mismatch(tmp_path):
    ck = Checkpointer(tmp_path, save_every=1, async_save=False)
    _save(ck, 1)
    ck.close()
    os.remove(tmp_path / "1" / "state" / "_METADATA")
    with pytest.raises(CorruptCheckpointError, match="_METADATA"):
        Checkpointer(tmp_path, save_every=1).restore(_abstract(), expected_model=MODEL)
    # A real mismatch is still one (the checksummed record says what was saved).
    bad = _abstract()
    bad["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match="step: checkpoint"):
        Checkpointer(tmp_path, save_every=1).restore(bad, expected_model=MODEL)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_everything_quarantined_refuses_a_fresh_start(tmp_path):
    ck = Checkpointer(tmp_path, save_every=1, async_save=False)
    _save(ck, 1)
    _save(ck, 2)
    ck.close()
    _corrupt(tmp_path / "1")
    _corrupt(tmp_path / "2")
    with pytest.raises(CorruptCheckpointError, match="No restorable"):  # quarantines both
        Checkpointer(tmp_path, save_every=1).restore(_abstract(), allow_fallback=True)
    ck = Checkpointer(tmp_path, save_every=1)
    assert ck.latest_step() is None and len(ck.quarantined()) == 2
    for fallback in (False, True):  # what the second run did: silently train from step 0
        with pytest.raises(CorruptCheckpointError, match="refusing to start from scratch.*start_from_scratch"):
            ck.restore(_abstract(), allow_fallback=fallback)
    assert ck.restore(_abstract(), fresh_start_ok=True) is None
    ck.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_only_reader_changes_nothing(tmp_path):
    ck = Checkpointer(tmp_path, keep=5, save_every=1, async_save=False)
    _save(ck, 1)
    _save(ck, 2)
    ck.close()
    _corrupt(tmp_path / "2")
    in_flight = tmp_path / "3.orbax-checkpoint-tmp-1234"  # a live trainer's save in progress
    shutil.copytree(tmp_path / "1", in_flight)
    before = sorted(os.listdir(tmp_path))
    reader = Checkpointer(tmp_path, save_every=1, read_only=True)
    assert reader.latest_step() == 2
    step, *_ = reader.restore(_abstract(), expected_model=MODEL, allow_fallback=True)  # skips 2, moves nothing
    assert step == 1
    with pytest.raises(PermissionError, match="read-only"):
        reader.save(3, _state(3.0), data_state={}, meta={"model": MODEL})
    reader.close()
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Checkpointer(tmp_path / "typo", save_every=1, read_only=True)
    assert not os.path.exists(tmp_path / "typo")


def test_protected_steps_survive_garbage_collection(tmp_path):
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    _save(ck, 1)
    ck.protect([1])
    _save(ck, 2)
    _save(ck, 3)
    ck.wait()
    assert _steps_on_disk(tmp_path) == [1, 3]
    ck.protect([])
    _save(ck, 4)
    ck.close()
    assert _steps_on_disk(tmp_path) == [4]


@pytest.fixture
def disk_full_at(monkeypatch):
    """Make the background write of the given step fail as a full disk would (errno ENOSPC)."""
    import errno

    import orbax.checkpoint as ocp

    steps = set()
    real = ocp.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if any(f"/{s}.orbax-checkpoint-tmp" in str(directory) for s in steps):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)
    return steps


def test_failed_async_save_raises_once_and_loses_nothing(tmp_path, disk_full_at, capfd):
    ck = Checkpointer(tmp_path, keep=1, save_every=1)
    _save(ck, 1)
    _save(ck, 2)
    disk_full_at.add(3)
    with pytest.raises(OSError, match=r"step 3 .*No space left on device.*newest: 2") as e:
        _save(ck, 3)  # fails in the background (if already failed, save's own poll raises)
        for _ in range(500):  # the trainer polls once per step
            ck.poll()
            time.sleep(0.01)
    assert type(e.value).__name__ == "CheckpointWriteError" and "\n" not in str(e.value)
    ck.close()
    assert _steps_on_disk(tmp_path) == [2]  # orbax's own GC would have run after the failed save
    assert "Traceback" not in capfd.readouterr().err


def test_unusable_directory_fails_at_once(tmp_path):
    from train.workdir import WorkdirError

    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        Checkpointer(tmp_path / "file", save_every=1)
    with pytest.raises(WorkdirError, match="a parent is a file"):
        Checkpointer(tmp_path / "file" / "ckpt", save_every=1)


def _mix_np(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def test_checksums_follow_the_documented_formula_leaf_by_leaf(monkeypatch):
    """``train/integrity.py``'s fingerprint (h1, h2) against numpy, and computed one leaf per program:
    one program over every leaf held ~2x the whole state in XLA temporaries at each save (``small``:
    +2.9 GB at the final checkpoint; docs/benchmarks.md, issue #15)."""
    from train import integrity

    seen = []
    plain = integrity._fingerprint_jit
    monkeypatch.setattr(integrity, "_fingerprint_jit", lambda x: seen.append(x.shape) or plain(x))
    rng = np.random.default_rng(0)
    tree = {
        "a": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
        "b": {
            "c": jnp.asarray(rng.integers(-9, 9, (7,)), jnp.int32),
            "d": jnp.asarray(rng.standard_normal(4), jnp.bfloat16),
        },
    }
    sums = integrity.tree_checksums(tree)
    assert sorted(seen) == sorted(x.shape for x in jax.tree.leaves(tree)), "one fingerprint call per leaf"
    with np.errstate(over="ignore"):
        for path, x in (("a", tree["a"]), ("b/c", tree["b"]["c"]), ("b/d", tree["b"]["d"])):
            raw = np.asarray(x).reshape(-1)
            w = raw.view(np.uint16).astype(np.uint32) if raw.dtype.itemsize == 2 else raw.view(np.uint32)
            i = np.arange(w.size, dtype=np.uint32)
            h1 = np.sum(w * (np.uint32(2) * i + np.uint32(1)), dtype=np.uint32)
            h2 = np.sum(_mix_np(w + np.uint32(0x9E3779B9) * i), dtype=np.uint32)
            assert sums[path][2] == f"{int(h1):08x}-{int(h2):08x}", path
