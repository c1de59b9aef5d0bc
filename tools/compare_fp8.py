"""Train one model with ``gemm_recipe="bf16"`` and ``"fp8"`` for several seeds, same data, and compare.

  python -m tools.compare_fp8 --workdir=runs/fp8_compare --out=docs/plot_fp8_vs_bf16.png   # 3 seeds

The model is ``configs/moe_tiny.py`` reshaped so every linear GEMM dimension is a multiple of 128
(``MODEL`` below; only ``wkv_a``'s output, c + r = 192, is padded to a whole block by the recipe, as
DeepSeek-V3's 576 is): under "fp8" all of them really run in e4m3 with 1x128 / 128x128 scales
(DeepSeek-V3 report Sec. 3.3). On CPU the "bf16" recipe computes in float32 (``dtype="auto"``), so
the comparison there is fp8 against f32. Every run goes through the normal trainer
(``train.trainer.train_and_evaluate``) in ``<workdir>/seed<s>/<recipe>``: a finished run is not
retrained, so a second call only re-reads, re-prints and re-plots.

Why several seeds: one pair of runs cannot resolve a gap of a few tenths of a percent. Two runs of
the same recipe that differ only in the initialisation seed end 300 steps apart by about as much as
the fp8-vs-bf16 gap of one seed (docs/benchmarks.md, "FP8 training (issue #10)"), and the gap of
one seed changes sign from one seed to the next. So each seed s (``train.seed``; the data order and
the eval batches are the same for every run, ``data.seed`` unchanged) trains both recipes, which is
a paired comparison, and the tool reports the mean of the per-seed gaps with its standard error.

Prints a markdown table (per seed: the final eval loss of each recipe and the relative gap
(fp8 - bf16) / bf16; the mean gap, its standard deviation and standard error over the seeds; the
bf16 runs' own seed-to-seed spread, the noise floor) and one JSON line with the same numbers;
DeepSeek reports < 0.25% at 16B / 230B scale. Writes the plot (``--out``, default
``<workdir>/fp8_vs_bf16.png``): both recipes' train-loss curves (smoothed as ``tools.plot`` does;
mean over the seeds, each seed faint) with the eval losses as markers, and the relative gap over
steps (each seed faint, their mean bold).
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from tools.plot import _save, _series, read_metrics, smooth  # noqa: E402

RECIPES = ("bf16", "fp8")
# moe_tiny with every linear GEMM's dims multiples of 128 (the fp8 recipe's block).
MODEL = dict(
    d_model=128,
    dense_ffn_dim=256,
    n_heads=2,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=8,
    n_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    moe_ffn_dim=128,
)


def make_config(recipe: str, *, steps: int, batch: int, seq_len: int, eval_every: int, eval_batches: int, overrides=()):
    """configs/moe_tiny.py with ``MODEL``, the run length, ``overrides`` ("model.n_layers=2", as
    ``--config.*`` takes them) and ``model.gemm_recipe = recipe``."""
    from configs import moe_tiny

    c = moe_tiny.get_config()
    c.model.update(MODEL)
    c.model.gemm_recipe = recipe
    c.train.steps = steps
    c.train.global_batch_size = batch
    c.train.eval_every = eval_every
    c.train.eval_batches = eval_batches
    c.train.checkpoint_every = steps
    c.train.progress = False
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, steps // 10))
    c.data.seq_len = seq_len
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = getattr(node, name)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        setattr(node, leaf, value)
    return c


def run(recipe: str, workdir: epath.Path, seed: int, *, overrides=(), **kw) -> float:
    """Train (or resume / re-read) one recipe's run of one seed; returns the wall seconds it took here."""
    from train.nonfinite import NonFiniteError
    from train.trainer import train_and_evaluate

    start = time.perf_counter()
    overrides = (f"train.seed={seed}", *overrides)
    try:
        train_and_evaluate(make_config(recipe, overrides=overrides, **kw), str(run_dir(workdir, seed, recipe)))
    except NonFiniteError as e:  # the comparison has no final loss to compare: say which run and why
        raise SystemExit(f"error: the {recipe} run in {run_dir(workdir, seed, recipe)} stopped: {e}") from None
    return time.perf_counter() - start


def run_dir(workdir: epath.Path, seed: int, recipe: str) -> epath.Path:
    return workdir / f"seed{seed}" / recipe


def compare(workdir: epath.Path, seeds) -> dict:
    """Per seed: both recipes' curves, final eval losses and their relative gap; over the seeds: the
    mean gap, its sample standard deviation and standard error (a paired comparison: each seed's
    two runs share the initialisation, the data order and the eval batches), and the noise floor,
    the spread of the bf16 runs' final eval loss over the seeds (relative standard deviation)."""
    per_seed = {}
    for seed in seeds:
        out = {}
        for recipe in RECIPES:
            rows = read_metrics(run_dir(workdir, seed, recipe))
            ev = _series(rows, "eval_loss")
            if ev is None:
                raise ValueError(
                    f"{run_dir(workdir, seed, recipe)}/metrics.jsonl has no eval_loss line: did the run finish?"
                )
            key = "main_loss" if _series(rows, "main_loss") is not None else "loss"
            out[recipe] = dict(train=_series(rows, key), eval=ev, train_key=key)
        bf, f8 = out["bf16"]["eval"][1][-1], out["fp8"]["eval"][1][-1]
        out["final_eval_loss"] = dict(bf16=float(bf), fp8=float(f8))
        out["rel_gap"] = float((f8 - bf) / bf)
        per_seed[seed] = out
    gaps = np.array([per_seed[s]["rel_gap"] for s in seeds])
    bf16 = np.array([per_seed[s]["final_eval_loss"]["bf16"] for s in seeds])
    n = len(seeds)
    std = float(gaps.std(ddof=1)) if n > 1 else None
    return dict(
        seeds=list(seeds),
        per_seed=per_seed,
        mean_rel_gap=float(gaps.mean()),
        std_rel_gap=std,
        sem_rel_gap=None if std is None else std / n**0.5,
        bf16_seed_spread=float(bf16.std(ddof=1) / bf16.mean()) if n > 1 else None,
    )


def _pct(x, sign="+") -> str:
    return "n/a" if x is None else f"{100 * x:{sign}.3f}%"


def table(result: dict, walls: dict) -> str:
    """Markdown: one row per seed, then the mean gap with its standard deviation and error."""
    lines = [
        "| seed | bf16 final eval loss | fp8 final eval loss | relative gap (fp8 - bf16) / bf16 | wall bf16 / fp8 (this call) |",
        "|---|---|---|---|---|",
    ]
    for seed in result["seeds"]:
        r = result["per_seed"][seed]
        wall = " / ".join(f"{walls[(seed, recipe)]:.0f} s" for recipe in RECIPES) if (seed, "fp8") in walls else ""
        lines.append(
            f"| {seed} | {r['final_eval_loss']['bf16']:.4f} | {r['final_eval_loss']['fp8']:.4f} | "
            f"{_pct(r['rel_gap'])} | {wall} |"
        )
    sd = "" if result["std_rel_gap"] is None else f" (std {100 * result['std_rel_gap']:.3f}%)"
    lines.append(f"| mean of {len(result['seeds'])} | | | {_pct(result['mean_rel_gap'])}{sd} | |")
    lines.append(
        f"\nmean gap {_pct(result['mean_rel_gap'])} +- {_pct(result['sem_rel_gap'], '')} (standard error); "
        f"bf16 final eval loss spread over the seeds (noise floor): "
        f"{_pct(result['bf16_seed_spread'], '')} "
        f"(relative standard deviation)"
    )
    return "\n".join(lines)


def plot(result: dict, out: epath.Path, *, smooth_weight: float = 0.9) -> epath.Path:
    """Left: both recipes' train loss (smoothed, mean over the seeds; each seed's faint) and eval
    loss (mean, markers). Right: the relative gap over steps, per seed (faint) and their mean."""
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(14, 5))
    seeds = result["seeds"]
    lo, hi = np.inf, -np.inf
    for i, recipe in enumerate(RECIPES):
        steps, curves = _common([result["per_seed"][s][recipe]["train"] for s in seeds], smooth_weight)
        for c in curves:
            ax_loss.plot(steps, c, color=f"C{i}", alpha=0.2, lw=0.8)
        ax_loss.plot(steps, curves.mean(0), color=f"C{i}", lw=1.5, label=f"{recipe}: train (smoothed)")
        lo, hi = min(lo, curves.min()), max(hi, curves.mean(0)[len(steps) // 10])  # zoom past the first drop
        es, ev = _common([result["per_seed"][s][recipe]["eval"] for s in seeds], None)
        ax_loss.plot(es, ev.mean(0), "o", color=f"C{i}", ms=5, label=f"{recipe}: eval")
    ax_loss.set_ylim(lo - 0.02 * (hi - lo), hi)
    gaps_t, gaps_e = [], []
    for seed in seeds:
        r = result["per_seed"][seed]
        st, (cb, cf) = _common([r["bf16"]["train"], r["fp8"]["train"]], smooth_weight)
        se, (eb, ef) = _common([r["bf16"]["eval"], r["fp8"]["eval"]], None)
        gaps_t.append((st, 100 * (cf / cb - 1)))
        gaps_e.append((se, 100 * (ef / eb - 1)))
        ax_gap.plot(st, gaps_t[-1][1], color="C2", alpha=0.2, lw=0.8)
        ax_gap.plot(se, gaps_e[-1][1], ".", color="C3", alpha=0.4, ms=4)
    st, gt = _common(gaps_t, None)
    ax_gap.plot(st, gt.mean(0), color="C2", lw=1.5, label=f"train loss (smoothed), mean of {len(seeds)} seeds")
    se, ge = _common(gaps_e, None)
    ax_gap.plot(se, ge.mean(0), "o-", color="C3", ms=5, label=f"eval loss, mean of {len(seeds)} seeds (dots: each)")
    for y in (-0.5, 0.5):
        ax_gap.axhline(y, color="gray", ls=":", lw=1)
    ax_gap.axhline(0, color="black", lw=0.6)
    key = result["per_seed"][seeds[0]]["bf16"]["train_key"]
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title=f"{key} and eval loss (mean of {len(seeds)} seeds)")
    ax_gap.set(xlabel="step", ylabel="(fp8 - bf16) / bf16  [%]", title="relative gap (dotted: +-0.5%)")
    for ax in (ax_loss, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sem = "" if result["sem_rel_gap"] is None else f" +- {100 * result['sem_rel_gap']:.3f}% (s.e.)"
    fig.suptitle(
        f"gemm_recipe fp8 vs bf16: final eval loss gap, mean of {len(seeds)} seeds, {_pct(result['mean_rel_gap'])}{sem}"
    )
    fig.tight_layout()
    return _save(fig, out)


def _common(series, smooth_weight):
    """[(steps, values)] -> (the steps all share, [n, steps] values there, each smoothed first if asked)."""
    steps = series[0][0]
    for s, _ in series[1:]:
        steps = np.intersect1d(steps, s)
    vals = []
    for s, v in series:
        v = np.asarray(v, np.float64) if smooth_weight is None else smooth(v, smooth_weight)
        vals.append(v[np.searchsorted(s, steps)])
    return steps, np.stack(vals)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="holds <workdir>/seed<s>/bf16 and <workdir>/seed<s>/fp8")
    p.add_argument("--out", default=None, help="plot file (default <workdir>/fp8_vs_bf16.png)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed of each pair of runs, comma-separated")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--override", action="append", default=[], help="config field, e.g. model.n_layers=2 (repeat)")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {a.seeds!r}")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds lists a seed twice: {a.seeds!r}")
    workdir = epath.Path(a.workdir)
    kw = dict(steps=a.steps, batch=a.batch, seq_len=a.seq_len, eval_every=a.eval_every, eval_batches=a.eval_batches)
    walls = {}
    for seed in seeds:
        for recipe in RECIPES:
            walls[(seed, recipe)] = run(recipe, workdir, seed, overrides=a.override, **kw)
    result = compare(workdir, seeds)
    print(table(result, walls))
    line = {k: result[k] for k in ("seeds", "mean_rel_gap", "std_rel_gap", "sem_rel_gap", "bf16_seed_spread")}
    line["per_seed"] = {
        s: dict(final_eval_loss=r["final_eval_loss"], rel_gap=r["rel_gap"]) for s, r in result["per_seed"].items()
    }
    line["wall_s"] = {f"{s}/{recipe}": w for (s, recipe), w in walls.items()}
    print(json.dumps(dict(**line, **kw, override=a.override)))
    out = plot(result, epath.Path(a.out) if a.out else workdir / "fp8_vs_bf16.png")
    print(f"plot: {out}")
    return result


if __name__ == "__main__":
    main()
