"""Study: load balancing without an auxiliary loss (issue #13; Wang et al. 2024, arXiv 2408.15664).

    python -m tools.study_balance [--seeds=0,1] [--override=train.steps=400] [--runs=runs/study_balance]

Four arms of configs/study_tiny.py (moe_tiny: 3 MoE layers of 16 routed experts, top-4 of which
group-limited, sigmoid router), identical but for how the experts are balanced:

- ``aux_free``: the selection bias b_i moved by gamma * sign(mean load - load_i) after every step
  (DeepSeek-V3 Sec. 2.1.2; gamma = 1e-3 as in the report), no balance loss at all (as in the paper);
- ``aux_free_fast``: the same with gamma = 1e-2. The bias moves at most gamma per step: the
  report's 1e-3 was set for runs of ~10^5 steps, and within this study's 200 steps it can move a
  bias by 0.2 at most, so the faster rate asks whether the rule works when given time to act;
- ``aux_loss``: the classic batch-wise auxiliary loss alpha * sum_i f_i P_i (GShard / Switch /
  DeepSeek-V2 eq. 23-25) with its usual weight alpha = 0.01, no bias;
- ``none``: neither.

The complementary sequence-wise loss of DeepSeek-V3 (train.balance_loss_alpha) is off in all four
and the MTP module is left out (model.mtp_depth=0), so the arms differ only in the balancing.
Measured: MaxVio_batch = max_i load_i / mean load - 1 of each step's global batch (the paper's
Sec. 4.1), averaged over the MoE layers, over the whole run and over its last 20% of steps; and
the final eval loss. The paper's direction: aux_free has a lower MaxVio than aux_loss at an equal
or better loss. Writes <runs>/study.jsonl, <runs>/table.md and docs/study_balance.png.
"""

from __future__ import annotations

import numpy as np
from absl import app
from etils import epath

from tools import study
from tools.plot import _save, plt, smooth

NAME = "balance"
COMMON = {"model.mtp_depth": 0, "train.balance_loss_alpha": 0.0}
ARMS = [
    study.Arm(
        "aux_free", {"model.use_aux_free_bias": True, "train.bias_update_rate": 1e-3, "train.aux_loss_alpha": 0.0}
    ),
    study.Arm(
        "aux_free_fast", {"model.use_aux_free_bias": True, "train.bias_update_rate": 1e-2, "train.aux_loss_alpha": 0.0}
    ),
    study.Arm(
        "aux_loss", {"model.use_aux_free_bias": False, "train.bias_update_rate": 0.0, "train.aux_loss_alpha": 0.01}
    ),
    study.Arm("none", {"model.use_aux_free_bias": False, "train.bias_update_rate": 0.0, "train.aux_loss_alpha": 0.0}),
]
COLUMNS = [
    ("maxvio_mean", "MaxVio_batch (run mean)", ".3f"),
    ("maxvio_last", "MaxVio_batch (last 20%)", ".3f"),
    ("final_eval_loss", "final eval loss", ".4f"),
]

study.define_flags()


def maxvio_curve(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, MaxVio_batch averaged over the main model's MoE layers) of one run."""
    n_moe = record["config"].model.n_layers - record["config"].model.first_k_dense
    rows = [r for r in record["rows"] if r.get("maxvio") is not None]
    return np.array([r["step"] for r in rows]), np.array([np.mean(r["maxvio"][:n_moe]) for r in rows])


def summarise(record: dict) -> dict:
    _, vio = maxvio_curve(record)
    last = vio[-max(1, len(vio) // 5) :]
    return {
        **record,
        "maxvio_mean": float(vio.mean()),
        "maxvio_last": float(last.mean()),
        "final_eval_loss": record["summary"]["final_eval_loss"],
        "final_balance_loss": float(study.series(record["rows"], "balance_loss")[1][-1]),
    }


def verdict(records: list[dict]) -> str:
    vio = study.seed_spread(records, "maxvio_last")
    loss = study.seed_spread(records, "final_eval_loss")
    seeds = len({r["seed"] for r in records})
    noise = max(s for _, s in loss.values())
    noise_txt = f"seed spread of the eval loss {noise:.4f}" if seeds > 1 else "one seed: no noise estimate"
    parts = [
        "MaxVio_batch (last 20%) / final eval loss: "
        + ", ".join(f"{a} {vio[a][0]:.3f} / {loss[a][0]:.4f}" for a in vio)
        + f" ({noise_txt})."
    ]
    for arm in ("aux_free", "aux_free_fast"):
        lower = vio[arm][0] < vio["aux_loss"][0]
        d_loss = loss[arm][0] - loss["aux_loss"][0]
        ok = lower and d_loss <= max(noise, 0.0)
        parts.append(
            f"{arm} vs aux_loss: MaxVio {'lower' if lower else 'NOT lower'}, eval loss {d_loss:+.4f}: "
            f"the paper's direction (lower MaxVio at equal or better loss) {'reproduced' if ok else 'NOT reproduced'}."
        )
    return " ".join(parts)


def plot(records: list[dict], path) -> None:
    fig, (ax_vio, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
    for i, arm in enumerate(dict.fromkeys(r["name"] for r in records)):
        for j, r in enumerate(x for x in records if x["name"] == arm):
            label = arm if j == 0 else None
            steps, vio = maxvio_curve(r)
            ax_vio.plot(steps, vio, color=f"C{i}", alpha=0.2, lw=0.8)
            ax_vio.plot(steps, smooth(vio, 0.9), color=f"C{i}", lw=1.5, label=label)
            ax_loss.plot(*study.series(r["rows"], "eval_loss"), "o-", color=f"C{i}", ms=4, label=label)
    ax_vio.set(xlabel="step", ylabel="max load / mean load - 1", yscale="log")
    ax_vio.set_title("MaxVio_batch, mean over MoE layers (smoothed; raw faint)")
    ax_loss.set(xlabel="step", ylabel="eval loss (nats / byte token)", title="eval loss")
    for ax in (ax_vio, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Load balancing: aux-loss-free bias (gamma 1e-3, 1e-2) vs auxiliary loss (alpha 0.01) vs none")
    fig.tight_layout()
    _save(fig, epath.Path(path))


def run(root, plot_path, *, common=None, arms=None, **kw) -> list[dict]:
    """``arms``: names of the arms to run (default all; the verdict needs all); ``kw``: see ``study.run_study``."""
    chosen = [a for a in ARMS if arms is None or a.name in arms]
    summarise_all = lambda records: [summarise(r) for r in records]  # noqa: E731
    title = "Load balancing (tools/study_balance.py)"
    return study.run_study(
        chosen,
        summarise_all,
        verdict,
        plot,
        title,
        COLUMNS,
        root,
        plot_path,
        complete=len(chosen) == len(ARMS),
        common={**COMMON, **(common or {})},
        **kw,
    )


def main(argv):
    del argv
    run(**study.flag_values(NAME))


if __name__ == "__main__":
    app.run(main)
