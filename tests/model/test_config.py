"""ModelConfig validation: bad shapes fail on construction with a message naming the field."""

import pytest

from model.config import ModelConfig
from tests.util import tiny_config


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_experts_per_tok=9), "n_experts_per_tok=9 exceeds n_routed_experts=8"),
        (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
        (dict(topk_group=5), "topk_group=5 exceeds n_group=4"),
        (dict(n_heads=0), "n_heads must be a positive int"),
        (dict(kv_lora_rank=-1), "kv_lora_rank must be a positive int"),
        (dict(q_lora_rank=0), "q_lora_rank must be None or a positive int"),
        (dict(qk_rope_head_dim=3), "qk_rope_head_dim must be even"),
        (dict(first_k_dense=7), "first_k_dense=7 must be in [0, n_layers=3]"),
        (dict(score_fn="relu"), "score_fn must be one of"),
        (dict(n_group=4, topk_group=1, n_experts_per_tok=3), "cannot hold n_experts_per_tok=3"),
        (dict(remat="sometimes"), "remat must be one of"),
    ],
)
def test_invalid_shapes_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(**kw)


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['d_modle'\]"):
        ModelConfig.from_dict({"d_modle": 3})


def test_auto_compute_dtype_resolves_in_model_config():
    """dtype "auto" is resolved on construction (f32 on the CPU test backend); param_dtype has no auto."""
    import jax

    cfg = tiny_config(dtype="auto")
    assert cfg.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert ModelConfig.from_dict({**cfg.__dict__, "dtype": "auto"}) == cfg
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        tiny_config(param_dtype="auto")
    with pytest.raises(ValueError, match="dtype must be one of"):
        tiny_config(dtype="fp8")
