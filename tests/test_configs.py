"""Every file in configs/ loads, resolves to a valid ModelConfig, and builds (abstractly)."""

import glob
import importlib.util
import os

import pytest

from model.param_count import count_params
from train.optimizer import make_optimizer
from train.trainer import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not os.path.basename(p).startswith("_")
                 and os.path.basename(p) != "base.py")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    cfg = model_config(config)
    assert count_params(cfg)["total_params"] > 0
    assert config.data.seq_len <= cfg.max_seq_len
    assert config.train.global_batch_size % config.train.microbatches == 0
    make_optimizer(config.optimizer, config.train.steps)  # the schedule is valid for the step count
