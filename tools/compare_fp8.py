"""Train one model twice, ``gemm_recipe="bf16"`` and ``"fp8"``, same seed and data, and compare.

  python -m tools.compare_fp8 --workdir=runs/fp8_compare                 # ~12 min on 2 CPU cores
  python -m tools.compare_fp8 --workdir=runs/fp8_compare --out=docs/plot_fp8_vs_bf16.png

The model is ``configs/moe_tiny.py`` reshaped so every linear GEMM dimension is a multiple of 128
(``MODEL`` below; only ``wkv_a``'s output, c + r = 192, is padded to a whole block by the recipe, as
DeepSeek-V3's 576 is): under "fp8" all of them really run in e4m3 with 1x128 / 128x128 scales
(DeepSeek-V3 report Sec. 3.3). Both runs go through the normal trainer
(``train.trainer.train_and_evaluate``) in ``<workdir>/bf16`` and ``<workdir>/fp8``: a finished run
is not retrained, so a second call only re-reads, re-prints and re-plots.

Prints a markdown table (final eval loss of each, relative gap (fp8 - bf16) / bf16; DeepSeek
reports < 0.25% at 16B / 230B scale) and one JSON line with the same numbers; writes the plot
(``--out``, default ``<workdir>/fp8_vs_bf16.png``): both train-loss curves (smoothed as
``tools.plot`` does, raw faint) with the eval losses as markers, and the relative gap over steps.
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


def run(recipe: str, workdir: epath.Path, **kw) -> float:
    """Train (or resume / re-read) one recipe's run; returns the wall seconds it took here."""
    from train.nonfinite import NonFiniteError
    from train.trainer import train_and_evaluate

    start = time.perf_counter()
    try:
        train_and_evaluate(make_config(recipe, **kw), str(workdir / recipe))
    except NonFiniteError as e:  # the comparison has no final loss to compare: say which run and why
        raise SystemExit(f"error: the {recipe} run in {workdir / recipe} stopped: {e}") from None
    return time.perf_counter() - start


def compare(workdir: epath.Path) -> dict:
    """Final eval loss per recipe, their relative gap, and the curves for the plot."""
    out = {}
    for recipe in RECIPES:
        rows = read_metrics(workdir / recipe)
        ev = _series(rows, "eval_loss")
        if ev is None:
            raise ValueError(f"{workdir / recipe}/metrics.jsonl has no eval_loss line: did the run finish?")
        key = "main_loss" if _series(rows, "main_loss") is not None else "loss"
        out[recipe] = dict(train=_series(rows, key), eval=ev, train_key=key)
    bf, f8 = out["bf16"]["eval"][1][-1], out["fp8"]["eval"][1][-1]
    out["final_eval_loss"] = dict(bf16=float(bf), fp8=float(f8))
    out["rel_gap"] = float((f8 - bf) / bf)
    return out


def table(result: dict, walls: dict) -> str:
    lines = [
        "| recipe | final eval loss | relative gap vs bf16 | wall (this call) |",
        "|---|---|---|---|",
    ]
    for recipe in RECIPES:
        gap = "" if recipe == "bf16" else f"{100 * result['rel_gap']:+.3f}%"
        wall = f"{walls[recipe]:.0f} s" if recipe in walls else ""
        lines.append(f"| {recipe} | {result['final_eval_loss'][recipe]:.4f} | {gap} | {wall} |")
    return "\n".join(lines)


def plot(result: dict, out: epath.Path, *, smooth_weight: float = 0.9) -> epath.Path:
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(14, 5))
    for i, recipe in enumerate(RECIPES):
        s, ev = result[recipe]["train"], result[recipe]["eval"]
        ax_loss.plot(*s, color=f"C{i}", alpha=0.25, lw=0.8)
        ax_loss.plot(s[0], smooth(s[1], smooth_weight), color=f"C{i}", lw=1.5, label=f"{recipe}: train")
        ax_loss.plot(*ev, "o", color=f"C{i}", ms=5, label=f"{recipe}: eval")
    (sb, lb), (sf, lf) = result["bf16"]["train"], result["fp8"]["train"]
    steps, ib, jf = np.intersect1d(sb, sf, return_indices=True)
    gap = smooth(lf[jf], smooth_weight) / smooth(lb[ib], smooth_weight) - 1
    ax_gap.plot(steps, 100 * gap, color="C2", lw=1.5, label="train loss (smoothed)")
    (eb_s, eb), (ef_s, ef) = result["bf16"]["eval"], result["fp8"]["eval"]
    es, ib, jf = np.intersect1d(eb_s, ef_s, return_indices=True)
    ax_gap.plot(es, 100 * (ef[jf] / eb[ib] - 1), "o-", color="C3", ms=5, label="eval loss")
    for y in (-0.5, 0.5):
        ax_gap.axhline(y, color="gray", ls=":", lw=1)
    ax_gap.axhline(0, color="black", lw=0.6)
    key = result["bf16"]["train_key"]
    ax_loss.set(xlabel="step", ylabel="loss (nats / token)", title=f"{key} (smoothed; raw faint) and eval loss")
    ax_gap.set(xlabel="step", ylabel="(fp8 - bf16) / bf16  [%]", title="relative gap (dotted: +-0.5%)")
    for ax in (ax_loss, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gemm_recipe fp8 vs bf16: final eval loss gap {100 * result['rel_gap']:+.3f}%")
    fig.tight_layout()
    return _save(fig, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="holds <workdir>/bf16 and <workdir>/fp8")
    p.add_argument("--out", default=None, help="plot file (default <workdir>/fp8_vs_bf16.png)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--override", action="append", default=[], help="config field, e.g. model.n_layers=2 (repeat)")
    a = p.parse_args(argv)
    workdir = epath.Path(a.workdir)
    kw = dict(steps=a.steps, batch=a.batch, seq_len=a.seq_len, eval_every=a.eval_every, eval_batches=a.eval_batches)
    walls = {recipe: run(recipe, workdir, overrides=a.override, **kw) for recipe in RECIPES}
    result = compare(workdir)
    print(table(result, walls))
    print(
        json.dumps(
            dict(
                final_eval_loss=result["final_eval_loss"],
                rel_gap=result["rel_gap"],
                wall_s=walls,
                **kw,
                override=a.override,
            )
        )
    )
    out = plot(result, epath.Path(a.out) if a.out else workdir / "fp8_vs_bf16.png")
    print(f"plot: {out}")
    return result


if __name__ == "__main__":
    main()
