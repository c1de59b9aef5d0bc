"""Plots runs' ``metrics.jsonl``: training curves and expert load.

    python -m tools.plot --workdir=runs/a [--out=DIR] [--smooth=0.9] [--logy]
    python -m tools.plot --workdir=runs/a --workdir=runs/b [--label=lr3e-3 --label=lr1e-3] --out=DIR

``loss.png``: six panels against the step: train loss (exponentially smoothed, the raw curve faint;
main and MTP losses dashed for one run, the main loss alone when overlaid) with the eval loss as markers; eval bits per byte with the
unigram baseline (``summary.json``'s ``unigram_bits_per_byte``, dotted); learning rate; gradient
norm (smoothed over faint raw, log scale); the sequence-wise balance loss; MaxVio (max over MoE
layers, and their mean dashed). Several ``--workdir`` overlay their runs, one colour per run.

``rl.png`` instead, for GRPO runs (``train.rl.main``; their metrics have ``reward_mean``): reward
(total and per reward function), sampled and held-out greedy accuracy, completion length mean/max,
KL and entropy (``plot_rl``).

``expert_load.png`` (``expert_load-<label>.png`` per run when several): at a fixed size whatever
the depth (DeepSeek-V3's 58 MoE layers + MTP stay readable), one heatmap of MoE layers x experts:
each expert's load over the mean load (1 = balanced; a diverging colour scale centred at 1),
averaged over the last logged steps; beside it, MaxVio as layers x steps. Layers are named by
their block index (``block 3``, ``MTP 1``) from the run's ``config.json``.

The file is read line by line (``iter_metrics``; per-layer lists become float32 arrays at once),
never whole. The workdir may be remote (``gs://...``, ``etils.epath``). Lines superseded by a
resume are never drawn (``drop_superseded``), so no line runs back in time.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from typing import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from train.paths import resolve  # noqa: E402

_ARRAYS = ("expert_load", "maxvio")  # per-layer lists, kept as float32 arrays
_FIXED_SIZE = (15, 8.5)  # inches: expert_load.png, whatever the number of layers


def iter_metrics(workdir) -> Iterator[dict]:
    """The lines of ``<workdir>/metrics.jsonl`` one at a time, per-layer lists as float32 arrays
    (NaN for null); a torn line (a killed run's last) is skipped with a warning."""
    path = resolve(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is --workdir the run's workdir (the one holding metrics.jsonl)?"
        )
    with path.open("r") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{i} is not valid JSON; skipped", file=sys.stderr)
                continue
            for k in _ARRAYS:
                if row.get(k) is not None:
                    row[k] = np.array(row[k], dtype=np.float32)  # None -> nan
            yield row


def read_metrics(workdir) -> list[dict]:
    """The lines a reader should draw: ``iter_metrics`` without the superseded ones."""
    return drop_superseded(iter_metrics(workdir))


def drop_superseded(rows) -> list[dict]:
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
    """Eval lines share their step with a train line: the LM's ``eval_*``, GRPO's ``heldout_accuracy``."""
    return any(k.startswith(("eval_", "heldout_")) for k in row)


def _series(rows, key):
    """(steps, values) of ``key`` (NaN for null), or None when no line has it."""
    pts = [(r["step"], np.nan if r[key] is None else r[key]) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)) if pts else None


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are skipped."""
    out, avg, norm = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isnan(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = avg / norm if norm else np.nan
    return out


def _curve(ax, s, color, label, weight, ls="-", raw=True):
    if s is None:
        return
    if raw:
        ax.plot(*s, color=color, alpha=0.25, lw=0.8)
    ax.plot(s[0], smooth(s[1], weight), color=color, ls=ls, lw=1.5, label=label)


def plot_losses(runs: list[tuple[str, list[dict], dict]], out: epath.Path, *, smooth_weight=0.9, logy=False):
    """``runs``: (label, rows, summary) per run."""
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax_loss, ax_bpb, ax_lr, ax_gn, ax_bal, ax_vio = axes.ravel()
    single = len(runs) == 1
    for i, (label, rows, summary) in enumerate(runs):
        c = f"C{i}"
        # overlaid runs: the main loss, the one the eval loss measures (no MTP or balance terms)
        key = "loss" if single or _series(rows, "main_loss") is None else "main_loss"
        _curve(ax_loss, _series(rows, key), c, "train loss" if single else f"{label}: train {key}", smooth_weight)
        if single:
            _curve(ax_loss, _series(rows, "main_loss"), "C1", "main loss", smooth_weight, "--", raw=False)
            _curve(ax_loss, _series(rows, "mtp_loss"), "C2", "MTP loss", smooth_weight, "--", raw=False)
        ev = _series(rows, "eval_loss")
        if ev is not None:
            ax_loss.plot(*ev, "o", color="C3" if single else c, ms=5, label="eval loss" if single else f"{label}: eval")
        bpb = _series(rows, "eval_bits_per_byte")
        if bpb is not None:
            ax_bpb.plot(*bpb, "o-", color=c, ms=4, label="eval" if single else label)
        if summary.get("unigram_bits_per_byte") is not None:
            u = summary["unigram_bits_per_byte"]
            ax_bpb.axhline(
                u, color=c, ls=":", lw=1.2, label=f"unigram baseline ({u:.2f})" + ("" if single else f" {label}")
            )
        lr = _series(rows, "lr")
        if lr is not None:
            ax_lr.plot(*lr, color=c, lw=1.5, label=label)
        _curve(ax_gn, _series(rows, "grad_norm"), c, label, smooth_weight)
        _curve(ax_bal, _series(rows, "balance_loss"), c, label, smooth_weight)
        vio = [r for r in rows if r.get("maxvio") is not None]
        if vio:
            steps, v = np.array([r["step"] for r in vio]), np.stack([r["maxvio"] for r in vio])  # [steps, layers]
            ax_vio.plot(steps, np.nanmax(v, 1), color=c, lw=1.2, label="max over layers" if single else label)
            ax_vio.plot(steps, np.nanmean(v, 1), color=c, lw=1.2, ls="--", label="mean over layers" if single else None)
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title="loss (smoothed; raw faint)")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="eval bits per byte")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_gn.set(xlabel="step", ylabel="global gradient norm", title="gradient norm (before clipping)", yscale="log")
    ax_bal.set(xlabel="step", ylabel="balance loss (unweighted)", title="sequence-wise balance loss")
    ax_vio.set(xlabel="step", ylabel="max load / mean load - 1", title="MaxVio over MoE layers")
    if logy:
        ax_loss.set_yscale("log")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1] and (single is False or ax in (ax_loss, ax_bpb, ax_vio)):
            ax.legend(fontsize=8)
    fig.suptitle(" vs ".join(label for label, _, _ in runs))
    fig.tight_layout()
    return _save(fig, out / "loss.png")


def plot_rl(runs: list[tuple[str, list[dict]]], out: epath.Path, *, smooth_weight=0.9):
    """GRPO runs (``train/rl``): four panels against the step. Reward: the weighted total's mean and,
    for one run, each reward function's mean (``reward/<name>_mean``, dashed). Accuracy: the sampled
    completions' (smoothed over faint raw) and the held-out greedy accuracy as markers. Completion
    length: mean (solid) and max (dotted). Policy: KL to the reference and per-token entropy."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_rew, ax_acc, ax_len, ax_pol = axes.ravel()
    single = len(runs) == 1
    for i, (label, rows) in enumerate(runs):
        c, name = f"C{i}", (lambda what: what if single else f"{label}: {what}")
        _curve(ax_rew, _series(rows, "reward_mean"), c, name("total (weighted)"), smooth_weight)
        fns = sorted({k[len("reward/") : -len("_mean")] for r in rows for k in r if re.fullmatch(r"reward/.+_mean", k)})
        for j, fn in enumerate(fns if single else []):
            _curve(ax_rew, _series(rows, f"reward/{fn}_mean"), f"C{j + 1}", fn, smooth_weight, "--", raw=False)
        _curve(ax_acc, _series(rows, "accuracy"), c, name("sampled (train)"), smooth_weight)
        held = _series(rows, "heldout_accuracy")
        if held is not None:
            ax_acc.plot(*held, "o-", color="C3" if single else c, ms=5, label=name("held-out greedy"))
        _curve(ax_len, _series(rows, "completion_length_mean"), c, name("mean"), smooth_weight)
        length_max = _series(rows, "completion_length_max")
        if length_max is not None:
            ax_len.plot(*length_max, color=c, ls=":", lw=1.2, label=name("max"))
        _curve(ax_pol, _series(rows, "kl"), c, name("KL to reference"), smooth_weight)
        _curve(ax_pol, _series(rows, "entropy"), c, name("entropy"), smooth_weight, "--", raw=False)
    ax_rew.set(xlabel="step", ylabel="reward per completion", title="reward (smoothed; raw faint)")
    ax_acc.set(xlabel="step", ylabel="fraction correct", title="accuracy", ylim=(-0.02, 1.02))
    ax_len.set(xlabel="step", ylabel="tokens", title="completion length")
    ax_pol.set(xlabel="step", ylabel="nats / token", title="policy: KL (k3) and entropy")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    fig.suptitle(" vs ".join(label for label, _ in runs))
    fig.tight_layout()
    return _save(fig, out / "rl.png")


def layer_names(n_rows: int, model: dict | None) -> list[str]:
    """Names of the rows of ``expert_load``: the MoE blocks by index, then the MTP modules."""
    if model:
        first, n_layers, mtp = model.get("first_k_dense", 0), model.get("n_layers", 0), model.get("mtp_depth", 0)
        if n_layers - first + mtp == n_rows:
            return [f"block {b}" for b in range(first, n_layers)] + [f"MTP {k + 1}" for k in range(mtp)]
    return [f"MoE layer {l}" for l in range(n_rows)]


def _layer_ticks(ax, names: list[str]):
    step = max(1, math.ceil(len(names) / 30))  # at most ~30 labels on the fixed height
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=7 if len(names) > 16 else 9)


def plot_expert_load(rows, out_file: epath.Path, model: dict | None = None, title: str = "", last: int = 5):
    """Layers x experts heatmap (mean of the last ``last`` logged steps) and a layers x steps MaxVio heatmap."""
    loads = [r for r in rows if r.get("expert_load") is not None]
    if not loads:
        return None
    window = loads[-last:]
    load = np.mean([r["expert_load"] for r in window], 0)  # [layers, experts], fractions of assignments
    ratio = load * load.shape[1]  # load / mean load
    names = layer_names(load.shape[0], model)
    fig, (ax, ax_vio) = plt.subplots(1, 2, figsize=_FIXED_SIZE, gridspec_kw={"width_ratios": [3, 2]})
    vmax = max(2.0, float(np.nanmax(ratio)))
    im = ax.imshow(
        ratio,
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax),
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, label="expert load / mean load (1 = balanced)")
    steps = f"step {window[0]['step']}" + (f"-{window[-1]['step']}" if len(window) > 1 else "")
    ax.set(
        xlabel="routed expert", ylabel="MoE layer", title=f"expert load, mean over {len(window)} logged steps ({steps})"
    )
    _layer_ticks(ax, names)
    vio = [r for r in rows if r.get("maxvio") is not None and len(r["maxvio"]) == len(names)]
    if vio:
        v = np.stack([r["maxvio"] for r in vio]).T  # [layers, steps]
        s0, s1 = vio[0]["step"], max(vio[-1]["step"], vio[0]["step"] + 1)
        im = ax_vio.imshow(
            v, aspect="auto", cmap="magma", interpolation="nearest", extent=[s0, s1, len(names) - 0.5, -0.5]
        )
        fig.colorbar(im, ax=ax_vio, label="MaxVio = max load / mean load - 1")
        _layer_ticks(ax_vio, names)
    ax_vio.set(xlabel="step", title="MaxVio per layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_file)


def _save(fig, path: epath.Path) -> epath.Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def _read_json(path: epath.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def plot_runs(workdirs, out=None, labels=None, *, smooth_weight: float = 0.9, logy: bool = False) -> list[epath.Path]:
    """Draws ``workdirs`` (overlaid when several) into ``out`` (default: the only workdir); returns the paths."""
    workdirs = list(workdirs)
    labels = list(labels or [resolve(w).name for w in workdirs])
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} --label for {len(workdirs)} --workdir")
    if out is None and len(workdirs) > 1:
        raise ValueError("several --workdir: give --out for the overlaid plots")
    runs = []
    for w, label in zip(workdirs, labels):
        rows = read_metrics(w)  # first: a mistyped --workdir creates nothing
        runs.append((label, rows, _read_json(resolve(w) / "summary.json"), _read_json(resolve(w) / "config.json")))
    out = resolve(out or workdirs[0])
    out.mkdir(parents=True, exist_ok=True)
    rl = [(label, rows) for label, rows, _, _ in runs if any("reward_mean" in r for r in rows)]
    if rl:  # GRPO runs: their own figure (a loss.png of theirs would be mostly empty panels)
        if len(rl) != len(runs):
            raise ValueError("cannot overlay GRPO runs (reward_mean in metrics.jsonl) with language-model runs")
        return [plot_rl(rl, out, smooth_weight=smooth_weight)]
    paths = [plot_losses([r[:3] for r in runs], out, smooth_weight=smooth_weight, logy=logy)]
    for label, rows, _, config in runs:
        name = "expert_load.png" if len(runs) == 1 else f"expert_load-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
        p = plot_expert_load(rows, out / name, config.get("model"), title=label)
        if p is None:
            print(f"no expert_load in {label}'s metrics.jsonl; {name} not drawn", file=sys.stderr)
        else:
            paths.append(p)
    return paths


def plot_workdir(workdir, out=None, logy: bool = False) -> list[epath.Path]:
    """Draws every plot for one run into ``out`` (default: the workdir); returns the paths."""
    return plot_runs([workdir], out, logy=logy)


FLAGS = flags.FLAGS
# Not required=True: other tools import this module's functions (tools/study.py) under their own flags.
flags.DEFINE_multi_string("workdir", None, "Run directory holding metrics.jsonl; repeat to overlay runs.")
flags.DEFINE_multi_string("label", None, "A name per --workdir for the legends (default: the directory names).")
flags.DEFINE_string("out", None, "Where to write the PNGs (default: the --workdir; needed for several).")
flags.DEFINE_float("smooth", 0.9, "Exponential smoothing weight of the train curves, in [0, 1).")
flags.DEFINE_bool("logy", False, "Log-scale y axis for the losses.")


def main(argv):
    del argv
    if not FLAGS.workdir:
        sys.exit("error: --workdir is required: the run directory holding metrics.jsonl")
    if not 0 <= FLAGS.smooth < 1:
        sys.exit(f"error: --smooth={FLAGS.smooth}: must be in [0, 1)")
    try:
        paths = plot_runs(FLAGS.workdir, FLAGS.out, FLAGS.label, smooth_weight=FLAGS.smooth, logy=FLAGS.logy)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for p in paths:
        print(p)


if __name__ == "__main__":
    app.run(main)
