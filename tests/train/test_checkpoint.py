import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.checkpoint import CheckpointMismatchError, Checkpointer, CorruptCheckpointError

MODEL = {"d_model": 8, "n_layers": 2, "yarn": None, "shape": (1, 2)}


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])


def _state(v: float):
    params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: jnp.full_like(p, v), params)
    return {"params": params, "step": jnp.asarray(int(v), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(int(v)))}


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
