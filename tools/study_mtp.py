"""Study: multi-token prediction (issue #13; DeepSeek-V3 report Sec. 2.2 and Table 4).

    python -m tools.study_mtp [--seeds=0,1] [--override=train.steps=400] [--runs=runs/study_mtp]

Two arms of configs/study_tiny.py (moe_tiny) with the same main model: ``mtp0`` without MTP
(model.mtp_depth=0) and ``mtp1`` with one MTP module (depth 1, loss weight lambda = 0.3 as in the
report's first stage). The MTP module is built after the main model, so both start from the same
main-model weights; only the training signal differs. Compared: the final eval loss, which is the
main head's next-token loss in both arms (``train/step.py`` ``make_eval_step`` reads
``ModelOutput.logits``, never the MTP logits), and the train main loss. The report's direction:
MTP improves the main model at equal main-model size (Table 4; measured there on benchmarks).
The MTP arm costs more training FLOPs (the module runs too); the table shows both.
Writes <runs>/study.jsonl, <runs>/table.md and docs/study_mtp.png.
"""

from __future__ import annotations

from absl import app
from etils import epath

from model.config import ModelConfig
from tools import study
from tools.plot import _save, plt, smooth
from train.flops import activated_params, model_flops_per_token

NAME = "mtp"
ARMS = [study.Arm("mtp0", {"model.mtp_depth": 0}), study.Arm("mtp1", {"model.mtp_depth": 1})]
COLUMNS = [
    ("main_params", "main-model params", ",d"),
    ("train_flops_per_token", "training FLOPs / token", ".3g"),
    ("final_eval_loss", "final eval loss (main head)", ".4f"),
    ("final_main_loss", "train main loss (last 20%)", ".4f"),
]

study.define_flags()


def summarise(record: dict) -> dict:
    cfg = ModelConfig.from_dict(record["config"].model.to_dict())
    _, main = study.series(record["rows"], "main_loss")
    return {
        **record,
        "main_params": int(record["summary"]["params"] - _mtp_params(record)),
        "train_flops_per_token": model_flops_per_token(cfg, record["config"].data.seq_len),
        "activated_main": activated_params(cfg, include_mtp=False)["total"],
        "final_eval_loss": record["summary"]["final_eval_loss"],
        "final_main_loss": float(main[-max(1, len(main) // 5) :].mean()),
    }


def _mtp_params(record: dict) -> int:
    """Parameters of the MTP modules (the run's total minus these = the main model's)."""
    import jax
    from flax import nnx

    from model.transformer import Transformer

    cfg = ModelConfig.from_dict(record["config"].model.to_dict())
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model.mtp, nnx.Param)))


def verdict(records: list[dict]) -> str:
    loss = study.seed_spread(records, "final_eval_loss")
    d = loss["mtp1"][0] - loss["mtp0"][0]
    seeds = len({r["seed"] for r in records})
    noise = max(s for _, s in loss.values())
    if seeds > 1:
        within = abs(d) <= noise
        noise_txt = f"seed spread {noise:.4f}: the difference is {'within' if within else 'beyond'} seed noise"
    else:
        within, noise_txt = False, "one seed: no noise estimate"
    better = d < 0 and not within
    return (
        f"Final eval loss of the main head: mtp0 {loss['mtp0'][0]:.4f}, mtp1 {loss['mtp1'][0]:.4f}, "
        f"mtp1 - mtp0 = {d:+.4f} ({noise_txt}). Report's direction (MTP improves the main model): "
        f"{'reproduced' if better else 'NOT reproduced'} at this scale."
    )


def plot(records: list[dict], path) -> None:
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 5))
    for i, arm in enumerate(dict.fromkeys(r["name"] for r in records)):
        for j, r in enumerate(x for x in records if x["name"] == arm):
            label = arm if j == 0 else None
            steps, main = study.series(r["rows"], "main_loss")
            ax_train.plot(steps, smooth(main, 0.9), color=f"C{i}", lw=1.5, label=label)
            ax_eval.plot(*study.series(r["rows"], "eval_loss"), "o-", color=f"C{i}", ms=4, label=label)
    ax_train.set(xlabel="step", ylabel="main next-token loss (nats)", title="train main loss (smoothed)")
    ax_eval.set(xlabel="step", ylabel="eval loss, main head (nats)", title="eval loss of the main head")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
    fig.suptitle("Multi-token prediction: depth 1 (lambda 0.3) vs none, same main model")
    fig.tight_layout()
    _save(fig, epath.Path(path))


def run(root, plot_path, *, arms=None, **kw) -> list[dict]:
    """``arms``: names of the arms to run (default all; the verdict needs all); ``kw``: see ``study.run_study``."""
    chosen = [a for a in ARMS if arms is None or a.name in arms]
    summarise_all = lambda records: [summarise(r) for r in records]  # noqa: E731
    title = "Multi-token prediction (tools/study_mtp.py)"
    return study.run_study(
        chosen, summarise_all, verdict, plot, title, COLUMNS, root, plot_path, complete=len(chosen) == len(ARMS), **kw
    )


def main(argv):
    del argv
    run(**study.flag_values(NAME))


if __name__ == "__main__":
    app.run(main)
