"""Readers of checkpoints (tools.generate and tools.convert_hf use ``load_model``) change nothing,
and ``tools.convert_hf export`` never mixes its files with an existing directory's."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from model.config import ModelConfig
from tests.train.test_trainer import TINY_MODEL
from tools import convert_hf
from train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights-only checkpoint of a tiny model (what ``tools.convert_hf import`` writes)."""
    out = tmp_path_factory.mktemp("weights")
    cfg = ModelConfig.from_dict({**dataclasses.asdict(ModelConfig()), **TINY_MODEL})
    _, abstract = convert_hf._abstract_weights(cfg)  # values do not matter here: zeros, no eager init
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    ck = Checkpointer(out, save_every=1, async_save=False)
    ck.save(1, state, data_state={}, meta={"model": dataclasses.asdict(cfg)}, force=True)
    ck.close()
    return out


def _tree(path):
    return sorted(
        (os.path.relpath(os.path.join(r, n), path), os.path.getmtime(os.path.join(r, n)))
        for r, ds, fs in os.walk(path)
        for n in ds + fs
    )


def test_load_model_leaves_a_live_directory_alone(weights, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(weights, live)
    # What a trainer writing step 2 has on disk: its in-flight tmp dir (orbax deleted it on open).
    shutil.copytree(live / "1", live / "2.orbax-checkpoint-tmp-1234")
    before = _tree(live)
    model = convert_hf.load_model(str(live))
    assert model.cfg.d_model == TINY_MODEL["d_model"]
    assert _tree(live) == before


def test_export_refuses_a_non_empty_directory_and_swaps_atomically(weights, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_hf.export_hf(str(weights), str(out))
    with pytest.raises(SystemExit, match="^error: --out .* is not an empty directory"):  # the CLI: one line
        convert_hf.main(["export", "--ckpt", str(weights), "--out", str(out)])
    assert os.listdir(out) == ["model-00001-of-00002.safetensors"]  # untouched
    shutil.rmtree(out)
    out.mkdir()  # an empty directory is fine
    files = convert_hf.export_hf(str(weights), str(out))
    extra = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    assert sorted(os.listdir(out)) == sorted(files + extra)
    assert os.listdir(tmp_path) == ["hf"]  # no temporary sibling left
