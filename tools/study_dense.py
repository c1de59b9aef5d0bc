"""Study: MoE vs dense at equal training compute (issue #13; DeepSeekMoE, arXiv 2401.06066 Sec. 4).

    python -m tools.study_dense [--seeds=0,1] [--override=train.steps=400] [--runs=runs/study_dense]

Four arms of configs/study_tiny.py, all without MTP (model.mtp_depth=0), trained on the same data,
tokens and steps, with the same optimizer and schedule:

- ``moe``: moe_tiny, DeepSeek-style (MLA; 1 dense + 3 DeepSeekMoE blocks, 16 routed experts of
  which 4 active + 1 shared expert, aux-loss-free balancing);
- ``dense_mla``: the same model with a dense SwiGLU in every block (first_k_dense = n_layers): a
  DeepSeek-style dense model, differing from ``moe`` in the FFN only;
- ``dense_llama``: the Llama-3.1-style dense model (``configs/study_tiny.py:llama_tiny``: GQA with
  4 query / 2 KV heads of dim 32, RoPE theta 5e5 with Llama-3.1 scaling, dense SwiGLU in every
  block): attention differs from ``moe`` too;
- ``moe_gqa``: moe_tiny's FFN blocks (1 dense + 3 MoE) under ``dense_llama``'s attention: with
  ``dense_llama`` it separates the FFN (MoE vs dense) from the attention (MLA vs GQA). Its FLOPs
  per token are higher than ``moe``'s (the GQA attention is wider), so it is compared with
  ``dense_llama`` on the loss-vs-FLOPs curve, not at equal FLOPs per token.

Each dense arm's width ``dense_ffn_dim`` is solved so that its training FLOPs per token
(``train/flops.py``: 6 x activated weights + attention scores) equal ``moe``'s: ``matched_dense``.
Compared: the final eval loss, and the eval loss against cumulative training FLOPs. The question:
how much less compute does the MoE need for a dense model's final loss? Answered by the MoE's
eval curve (linear interpolation in log FLOPs between eval points): the FLOPs at which it first
reaches the dense model's final eval loss, against the dense model's total. Caveat: a point in the
middle of a run is not a run of that length (its learning rate has not decayed yet), so the ratio
is a lower bound on what separate, shorter MoE runs would show.
Writes <runs>/study.jsonl, <runs>/table.md and docs/study_dense.png.
"""

from __future__ import annotations

import math

from absl import app
from etils import epath

from model.config import ModelConfig
from tools import study
from tools.plot import _save, plt, smooth
from train.flops import activated_params, model_flops_per_token

NAME = "dense"
COMMON = {"model.mtp_depth": 0}
COLUMNS = [
    ("params", "params", ",d"),
    ("activated", "activated params", ",d"),
    ("flops_per_token", "training FLOPs / token", ".4g"),
    ("train_flops", "training FLOPs", ".3g"),
    ("final_eval_loss", "final eval loss", ".4f"),
]

study.define_flags()


def model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def matched_dense(config_file: str, common: dict, dense_config: str | None = None) -> dict:
    """Overrides of a dense arm (``dense_config``, default ``config_file``): a dense SwiGLU in every
    block, its width chosen so that the training FLOPs per token equal the MoE arm's (they are
    linear in dense_ffn_dim; attention may differ, e.g. GQA against MLA)."""
    dense_config = dense_config or config_file
    base = study.load_config(config_file, common)
    seq = base.data.seq_len
    target = model_flops_per_token(model_config(base), seq)
    dense = {"model.first_k_dense": study.load_config(dense_config, common).model.n_layers}

    def flops(f: int) -> float:
        cfg = study.load_config(dense_config, {**common, **dense, "model.dense_ffn_dim": f})
        return model_flops_per_token(model_config(cfg), seq)

    per_unit = flops(2) - flops(1)
    f = max(1, round(1 + (target - flops(1)) / per_unit))
    return {**dense, "model.dense_ffn_dim": f}


def arms(config_file: str, common: dict) -> list[study.Arm]:
    """The MoE, a dense model with the same MLA blocks, the Llama-style dense model, and the MoE with
    the Llama-style model's attention."""
    path = config_file.partition(":")[0]
    llama = f"{path}:llama_tiny"
    return [
        study.Arm("moe", {}),
        study.Arm("dense_mla", matched_dense(config_file, common)),
        study.Arm("dense_llama", matched_dense(config_file, common, llama), llama),
        # moe_tiny's MoE blocks under the Llama-style model's attention (more FLOPs per token than moe)
        study.Arm("moe_gqa", {"model.first_k_dense": 1}, llama),
    ]


def summarise(record: dict) -> dict:
    cfg = model_config(record["config"])
    per_token = model_flops_per_token(cfg, record["config"].data.seq_len)
    tokens_per_step = record["config"].train.global_batch_size * record["config"].data.seq_len
    steps, ev = study.series(record["rows"], "eval_loss")
    return {
        **record,
        "params": int(record["summary"]["params"]),
        "activated": int(activated_params(cfg)["total"]),
        "flops_per_token": per_token,
        "train_flops": per_token * tokens_per_step * record["summary"]["steps"],
        "final_eval_loss": record["summary"]["final_eval_loss"],
        "eval_flops": (steps * tokens_per_step * per_token).tolist(),
        "eval_losses": ev.tolist(),
    }


def flops_to_reach(flops: list[float], losses: list[float], target: float) -> float | None:
    """FLOPs at which the eval curve first reaches ``target`` (linear in log FLOPs), or None."""
    for i, (x, y) in enumerate(zip(flops, losses)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = flops[i - 1], losses[i - 1]
            w = (y0 - target) / (y0 - y)
            return math.exp(math.log(x0) + w * (math.log(x) - math.log(x0)))
    return None


# (MoE arm, dense arm) compared: same FFN FLOPs and MLA; the matched Llama-style model; same GQA attention
PAIRS = (("moe", "dense_mla"), ("moe", "dense_llama"), ("moe_gqa", "dense_llama"))


def compare(records: list[dict]) -> dict:
    """Per ((MoE arm, dense arm), seed): the MoE's FLOPs to reach the dense final loss and the
    ratio dense / MoE; the dense model's FLOPs to reach the MoE's, and MoE / dense."""
    out = {}
    for seed in dict.fromkeys(r["seed"] for r in records):
        for moe_name, name in PAIRS:
            moe = next(r for r in records if r["seed"] == seed and r["name"] == moe_name)
            dense = next(r for r in records if r["seed"] == seed and r["name"] == name)
            need = flops_to_reach(moe["eval_flops"], moe["eval_losses"], dense["final_eval_loss"])
            # the other way round, for a dense model that ends below the MoE
            dense_need = flops_to_reach(dense["eval_flops"], dense["eval_losses"], moe["final_eval_loss"])
            out[(moe_name, name), seed] = {
                "moe_flops_to_dense_loss": need,
                "compute_ratio": None if need is None else dense["train_flops"] / need,
                "dense_flops_to_moe_loss": dense_need,
                "dense_compute_ratio": None if dense_need is None else moe["train_flops"] / dense_need,
                "loss_gap": dense["final_eval_loss"] - moe["final_eval_loss"],
            }
    return out


def verdict(records: list[dict], cmp: dict) -> str:
    seeds = len({r["seed"] for r in records})
    loss = study.seed_spread(records, "final_eval_loss")
    noise = max(s for _, s in loss.values())
    parts = []
    for ((moe, dense), seed), c in cmp.items():
        if c["compute_ratio"] is not None:
            ratio = f"{moe} reached {dense}'s final loss with {c['compute_ratio']:.2f}x less compute"
        else:
            ratio = f"{moe} never reached {dense}'s final loss"
            if c["dense_compute_ratio"] is not None:
                ratio += f"; {dense} reached {moe}'s with {c['dense_compute_ratio']:.2f}x less compute"
        parts.append(f"{dense} - {moe} final eval loss (seed {seed}) {c['loss_gap']:+.4f}: {ratio}")
    noise_txt = f"seed spread {noise:.4f}" if seeds > 1 else "one seed: no noise estimate"
    margin = noise if seeds > 1 else 0.0
    wins = {pair: min(c["loss_gap"] for (p, _), c in cmp.items() if p == pair) > margin for pair in PAIRS}
    return (
        "; ".join(parts)
        + f" ({noise_txt}). Direction (the MoE reaches the dense model's loss with less compute): "
        + ", ".join(f"{m} vs {d} {'reproduced' if w else 'NOT reproduced'}" for (m, d), w in wins.items())
        + " at this scale."
    )


def plot(records: list[dict], cmp: dict, path) -> None:
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"moe": "C0", "dense_mla": "C1", "dense_llama": "C2", "moe_gqa": "C3"}
    for r in records:
        first = r["seed"] == records[0]["seed"]
        c = colors[r["name"]]
        label = (
            f"{r['name']} ({r['activated'] / 1e6:.2f}M activated, {r['params'] / 1e6:.2f}M total)" if first else None
        )
        tokens_per_step = r["config"].train.global_batch_size * r["config"].data.seq_len
        steps, loss = study.series(r["rows"], "main_loss")
        ax_train.plot(steps * tokens_per_step * r["flops_per_token"], smooth(loss, 0.9), color=c, label=label)
        ax_eval.plot(r["eval_flops"], r["eval_losses"], "o-", color=c, ms=4, label=label)
    for ((moe, name), seed), c in cmp.items():
        dense = next(r for r in records if r["seed"] == seed and r["name"] == name)
        ax_eval.axhline(dense["final_eval_loss"], color=colors[name], ls=":", lw=1)
        if c["moe_flops_to_dense_loss"] is not None:
            ax_eval.axvline(c["moe_flops_to_dense_loss"], color=colors[moe], ls=":", lw=1)
    ax_train.set(xlabel="training FLOPs", ylabel="train loss (nats)", xscale="log", title="train loss (smoothed)")
    ax_eval.set(xlabel="training FLOPs", ylabel="eval loss (nats)", xscale="log")
    ax_eval.set_title("eval loss; dotted: dense final losses, the FLOPs where an MoE reaches them", fontsize=10)
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
    fig.suptitle("MoE vs dense at equal training FLOPs per token (same data, tokens and steps)")
    fig.tight_layout()
    _save(fig, epath.Path(path))


def summarise_all(records: list[dict]) -> list[dict]:
    """Each run's numbers, and on each dense arm its comparisons ``vs_<moe arm>`` with the MoEs of
    the same seed."""
    records = [summarise(r) for r in records]
    for ((moe, name), seed), c in compare(records).items():
        next(r for r in records if r["seed"] == seed and r["name"] == name)[f"vs_{moe}"] = c
    return records


def run(root, plot_path, *, config_file=study.DEFAULT_CONFIG, common=None, **kw) -> list[dict]:
    """``kw``: see ``study.run_study``."""
    common = {**COMMON, **(common or {})}
    title = "MoE vs dense (tools/study_dense.py)"
    return study.run_study(
        arms(config_file, common),
        summarise_all,
        lambda rs: verdict(rs, compare(rs)),
        lambda rs, path: plot(rs, compare(rs), path),
        title,
        COLUMNS,
        root,
        plot_path,
        config_file=config_file,
        common=common,
        **kw,
    )


def main(argv):
    del argv
    run(**study.flag_values(NAME))


if __name__ == "__main__":
    app.run(main)
