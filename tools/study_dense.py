"""Study: MoE vs dense at equal training compute (issue #13; DeepSeekMoE, arXiv 2401.06066 Sec. 4).

    python -m tools.study_dense [--seeds=0,1] [--override=train.steps=400] [--runs=runs/study_dense]

Two arms of configs/study_tiny.py, both without MTP (model.mtp_depth=0), trained on the same data,
tokens and steps:

- ``moe``: moe_tiny, DeepSeek-style (MLA; 1 dense + 3 DeepSeekMoE blocks, 16 routed experts of
  which 4 active + 1 shared expert, aux-loss-free balancing);
- ``dense``: the same model with a dense SwiGLU in every block (first_k_dense = n_layers) whose
  width ``dense_ffn_dim`` is solved so that its training FLOPs per token (``train/flops.py``:
  6 x activated weights + attention) equal the MoE's: ``matched_dense``.

Compared: the final eval loss, and the eval loss against cumulative training FLOPs. The question:
how much less compute does the MoE need for the dense model's final loss? Answered by the MoE's
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
    ("name", "arm", ""),
    ("seed", "seed", ""),
    ("params", "params", ",d"),
    ("activated", "activated params", ",d"),
    ("flops_per_token", "training FLOPs / token", ".4g"),
    ("train_flops", "training FLOPs", ".3g"),
    ("final_eval_loss", "final eval loss", ".4f"),
    ("wall_s", "wall (s)", ".0f"),
]

study.define_flags()


def model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def matched_dense(config_file: str, common: dict) -> dict:
    """Overrides of the dense arm: a dense SwiGLU in every block, its width chosen so that the
    training FLOPs per token equal the MoE arm's (they are linear in dense_ffn_dim)."""
    base = study.load_config(config_file, common)
    seq = base.data.seq_len
    target = model_flops_per_token(model_config(base), seq)
    dense = {"model.first_k_dense": base.model.n_layers}

    def flops(f: int) -> float:
        return model_flops_per_token(
            model_config(study.load_config(config_file, {**common, **dense, "model.dense_ffn_dim": f})), seq
        )

    per_unit = flops(2) - flops(1)
    f = max(1, round(1 + (target - flops(1)) / per_unit))
    return {**dense, "model.dense_ffn_dim": f}


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


def compare(records: list[dict]) -> dict:
    """Per seed: the MoE's FLOPs to reach the dense final loss, and the ratio dense / MoE."""
    out = {}
    for seed in dict.fromkeys(r["seed"] for r in records):
        moe, dense = (next(r for r in records if r["seed"] == seed and r["name"] == n) for n in ("moe", "dense"))
        need = flops_to_reach(moe["eval_flops"], moe["eval_losses"], dense["final_eval_loss"])
        out[seed] = {
            "moe_flops_to_dense_loss": need,
            "compute_ratio": None if need is None else dense["train_flops"] / need,
            "loss_gap": dense["final_eval_loss"] - moe["final_eval_loss"],
        }
    return out


def verdict(records: list[dict], cmp: dict) -> str:
    parts = []
    for seed, c in cmp.items():
        ratio = "the MoE never reached it" if c["compute_ratio"] is None else f"{c['compute_ratio']:.2f}x less compute"
        parts.append(
            f"seed {seed}: dense - MoE final eval loss = {c['loss_gap']:+.4f}; MoE at the dense's final loss: {ratio}"
        )
    gaps = [c["loss_gap"] for c in cmp.values()]
    seeds = len(cmp)
    loss = study.seed_spread(records, "final_eval_loss")
    noise = max(s for _, s in loss.values())
    if seeds > 1:
        noise_txt = f"seed spread {noise:.4f}"
        win = min(gaps) > noise
    else:
        noise_txt, win = "one seed: no noise estimate", min(gaps) > 0
    return (
        "; ".join(parts)
        + f" ({noise_txt}). Direction (the MoE reaches the dense model's loss with less compute): "
        + ("reproduced" if win else "NOT reproduced")
        + " at this scale."
    )


def plot(records: list[dict], cmp: dict, path) -> None:
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 5))
    for i, arm in enumerate(dict.fromkeys(r["name"] for r in records)):
        for j, r in enumerate(x for x in records if x["name"] == arm):
            label = f"{arm} ({r['activated'] / 1e6:.2f}M activated, {r['params'] / 1e6:.2f}M total)" if j == 0 else None
            tokens_per_step = r["config"].train.global_batch_size * r["config"].data.seq_len
            steps, loss = study.series(r["rows"], "main_loss")
            ax_train.plot(steps * tokens_per_step * r["flops_per_token"], smooth(loss, 0.9), color=f"C{i}", label=label)
            ax_eval.plot(r["eval_flops"], r["eval_losses"], "o-", color=f"C{i}", ms=4, label=label)
    for seed, c in cmp.items():
        dense = next(r for r in records if r["seed"] == seed and r["name"] == "dense")
        ax_eval.axhline(dense["final_eval_loss"], color="C1", ls=":", lw=1)
        if c["moe_flops_to_dense_loss"] is not None:
            ax_eval.axvline(c["moe_flops_to_dense_loss"], color="C0", ls=":", lw=1)
    ax_train.set(xlabel="training FLOPs", ylabel="train loss (nats)", xscale="log", title="train loss (smoothed)")
    ax_eval.set(xlabel="training FLOPs", ylabel="eval loss (nats)", xscale="log")
    ax_eval.set_title("eval loss; dotted: dense final loss, FLOPs where the MoE reaches it")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
    fig.suptitle("MoE vs dense at equal training FLOPs per token")
    fig.tight_layout()
    _save(fig, epath.Path(path))


def run(root, plot_path, *, config_file=study.DEFAULT_CONFIG, seeds=(0,), common=None) -> list[dict]:
    common = {**COMMON, **(common or {})}
    arms = [study.Arm("moe", {}), study.Arm("dense", matched_dense(config_file, common))]
    records = [summarise(r) for r in study.run_arms(arms, root, seeds=seeds, config_file=config_file, common=common)]
    cmp = compare(records)
    for r in records:
        r.update(cmp[r["seed"]] if r["name"] == "moe" else {})
    study.write_table(root, records, COLUMNS, "MoE vs dense (tools/study_dense.py)", note=verdict(records, cmp))
    plot(records, cmp, plot_path)
    return records


def main(argv):
    del argv
    run(**study.flag_values(NAME))


if __name__ == "__main__":
    app.run(main)
