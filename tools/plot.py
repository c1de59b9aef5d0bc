"""Plots a run's ``metrics.jsonl``: losses and expert load.

    python -m tools.plot --workdir=runs/tiny [--out=runs/tiny/plots] [--logy]

Writes ``loss.png`` (train loss, main / MTP / balance loss, eval loss vs step) and, when the run
logged them, ``expert_load.png`` (per MoE layer: experts x steps heatmap of the fraction of
assignments each expert received, plus a layers x steps MaxVio heatmap). Prints the paths.

The workdir may be remote (``gs://...``, through ``etils.epath``). Lines superseded by a resume
are never drawn (``read_metrics``), so no line runs back in time, also for a ``metrics.jsonl``
written before the trainer took them out itself.
"""

from __future__ import annotations

import io
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from train.paths import resolve  # noqa: E402

_LOSS_KEYS = ("loss", "main_loss", "mtp_loss", "eval_loss")


def read_metrics(workdir) -> list[dict]:
    """Parses ``<workdir>/metrics.jsonl``; skips a torn last line of a killed run and drops superseded lines."""
    path = resolve(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is --workdir the run's workdir (the one holding metrics.jsonl)?"
        )
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{i} is not valid JSON; skipped", file=sys.stderr)
    return drop_superseded(rows)


def drop_superseded(rows: list[dict]) -> list[dict]:
    """The lines a resumed run did not redo. A line for a step at or before one already seen of its
    kind (train or eval), or before the newest step, starts a resume: every earlier line for that
    step or later is dropped. The result's steps never decrease."""
    kept: list[dict] = []
    for r in rows:
        step, is_eval = r["step"], _is_eval(r)
        same_step = []  # kept is sorted by step: the lines of this step are at its end
        for k in reversed(kept):
            if k["step"] != step:
                break
            same_step.append(k)
        if (kept and step < kept[-1]["step"]) or any(_is_eval(k) == is_eval for k in same_step):
            kept = [k for k in kept if k["step"] < step]
        kept.append(r)
    return kept


def _is_eval(row: dict) -> bool:
    return any(k.startswith("eval_") for k in row)


def _series(rows, key):
    pts = [(r["step"], np.nan if r[key] is None else r[key]) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)) if pts else None


def plot_losses(rows, out: epath.Path, logy: bool = False) -> epath.Path:
    fig, (ax, ax_bal) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in _LOSS_KEYS:
        s = _series(rows, key)
        if s is not None:
            ax.plot(*s, label=key, marker="o" if key == "eval_loss" else None, lw=1)
    ax.set(xlabel="step", ylabel="loss", title="losses")
    bal = _series(rows, "balance_loss")
    if bal is not None:
        ax_bal.plot(*bal, color="tab:red", lw=1)
    ax_bal.set(xlabel="step", title="balance_loss (sequence-wise aux)")
    if logy:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return _save(fig, out / "loss.png")


def plot_expert_load(rows, out: epath.Path) -> epath.Path | None:
    rows = [r for r in rows if r.get("expert_load") is not None]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    load = np.array([r["expert_load"] for r in rows], float)  # [steps, layers, experts]
    n_layers = load.shape[1]
    vio = [r for r in rows if r.get("maxvio") is not None]
    fig, axes = plt.subplots(n_layers + 1, 1, figsize=(10, 2.2 * (n_layers + 1)), squeeze=False)
    extent = [steps[0], max(steps[-1], steps[0] + 1), -0.5, load.shape[2] - 0.5]
    for l in range(n_layers):
        ax = axes[l, 0]
        im = ax.imshow(
            load[:, l, :].T, aspect="auto", origin="lower", extent=extent, cmap="viridis", interpolation="nearest"
        )
        ax.set(ylabel="expert", title=f"MoE layer {l}: fraction of assignments")
        fig.colorbar(im, ax=ax)
    ax = axes[-1, 0]
    if vio:
        v = np.array([[np.nan if x is None else x for x in r["maxvio"]] for r in vio], float)  # [steps, layers]
        im = ax.imshow(
            v.T,
            aspect="auto",
            origin="lower",
            cmap="magma",
            interpolation="nearest",
            extent=[vio[0]["step"], max(vio[-1]["step"], vio[0]["step"] + 1), -0.5, v.shape[1] - 0.5],
        )
        fig.colorbar(im, ax=ax)
    ax.set(xlabel="step", ylabel="MoE layer", title="MaxVio (max load / mean load - 1)")
    fig.tight_layout()
    return _save(fig, out / "expert_load.png")


def _save(fig, path: epath.Path) -> epath.Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def plot_workdir(workdir, out=None, logy: bool = False) -> list[epath.Path]:
    """Draws every plot for ``workdir`` into ``out`` (default: the workdir); returns the paths."""
    rows = read_metrics(workdir)  # first: a mistyped --workdir creates nothing
    out = resolve(out or workdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_losses(rows, out, logy)]
    load = plot_expert_load(rows, out)
    if load is None:
        print("no expert_load in metrics.jsonl; expert_load.png not drawn", file=sys.stderr)
    else:
        paths.append(load)
    return paths


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.", required=True)
flags.DEFINE_string("out", None, "Where to write the PNGs (default: --workdir).")
flags.DEFINE_bool("logy", False, "Log-scale y axis for the losses.")


def main(argv):
    del argv
    try:
        paths = plot_workdir(FLAGS.workdir, FLAGS.out, FLAGS.logy)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    for p in paths:
        print(p)


if __name__ == "__main__":
    app.run(main)
