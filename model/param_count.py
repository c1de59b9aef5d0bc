"""Parameter counts from abstract shapes (``nnx.eval_shape``: nothing is allocated)."""

import collections

import jax
from flax import nnx

from model.config import ModelConfig


def abstract_model(cfg: ModelConfig):
    from model.transformer import Transformer

    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _component(path: tuple) -> str:
    keys = [str(p) for p in path]
    top = keys[0]
    if top in ("embed", "head", "final_norm"):
        return top
    if top == "mtp":
        return "mtp"
    kind = "dense" if top == "dense_blocks" else "moe"
    if "attn" in keys:
        return f"{kind}_blocks.attention"
    if "router" in keys:
        return "moe_blocks.router"
    if "shared" in keys or "shared_gate" in keys:
        return "moe_blocks.shared_experts"
    if any(k in ("w_gate", "w_up", "w_down") for k in keys) and kind == "moe":
        return "moe_blocks.routed_experts"
    if "mlp" in keys:
        return "dense_blocks.ffn"
    return f"{kind}_blocks.norms"


def count_params(cfg: ModelConfig) -> dict:
    """Per-component totals plus ``total_params`` / ``activated_params`` (main model, MTP
    excluded; activated = all but the (E - k) unused routed experts of every MoE layer) and
    ``mtp_params`` (the MTP modules' own weights; they share the embedding and head)."""
    model = abstract_model(cfg)
    comps = collections.OrderedDict()
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        keys = tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)
        keys = tuple(k for k in keys if k != "value")
        name = _component(keys)
        comps[name] = comps.get(name, 0) + int(leaf.size)
    mtp = comps.pop("mtp", 0)
    total = sum(comps.values())
    per_expert = 3 * cfg.d_model * cfg.moe_ffn_dim
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_experts_per_tok) * per_expert
    return {"components": dict(comps), "total_params": total, "activated_params": total - inactive, "mtp_params": mtp}
