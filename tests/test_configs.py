"""Every file in configs/ loads, resolves to a valid ModelConfig, and builds (abstractly)."""

import dataclasses
import glob
import importlib.util
import os

import pytest

from model.config import ModelConfig
from model.param_count import count_params
from train.optimizer import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_") and os.path.basename(p) != "base.py"
)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    cfg = ModelConfig.from_dict(config.model.to_dict())
    assert count_params(cfg)["total_params"] > 0
    assert config.data.seq_len <= cfg.max_seq_len
    assert config.train.global_batch_size % config.train.microbatches == 0
    make_optimizer(config.optimizer, config.train.steps)  # the schedule is valid for the step count


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_model_is_exactly_model_config(path):
    """config.model holds ModelConfig's fields, no more and no fewer; the kernel switch
    kernels.impl is model.kernels_impl; dtype "auto" resolves in ModelConfig."""
    from tests.util import load_config_file

    config = load_config_file(path)
    assert set(config.model.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig.from_dict(config.model.to_dict())
    assert cfg.dtype in ("float32", "bfloat16") and cfg.kernels_impl == config.kernels.impl
    config.kernels.impl = "pallas"
    assert ModelConfig.from_dict(config.model.to_dict()).kernels_impl == "pallas"


@pytest.mark.parametrize("name", ["deepseek_v3_671b.py", "deepseek_v3_671b_pod.py", "moe_tiny.py", "small.py"])
def test_pretraining_recipes_use_plain_rope(name):
    """YaRN is the context-extension stage (DeepSeek-V3 report Sec. 4.3), not pre-training; the
    preset for the released weights keeps it."""
    from model import presets
    from tests.util import load_config_file

    cfg = ModelConfig.from_dict(load_config_file(os.path.join(ROOT, "configs", name)).model.to_dict())
    assert cfg.yarn is None
    assert cfg.softmax_scale == cfg.qk_head_dim**-0.5
    released = presets.deepseek_v3_671b()
    assert released.yarn is not None and released.yarn.factor == 40.0
    assert released.softmax_scale > 1.8 * released.qk_head_dim**-0.5  # YaRN's mscale^2 ~ 1.87
