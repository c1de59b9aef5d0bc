"""Shared by the ablation studies of issue #13 (``tools/study_balance.py``, ``study_mtp.py``,
``study_dense.py``): train a study's arms with the normal trainer, read their ``metrics.jsonl``,
write the table.

An arm is a config file (default ``configs/study_tiny.py``) plus ``--config.*`` overrides, trained by
``train.trainer.train_and_evaluate`` in a fresh workdir ``<root>/<arm>``. The equivalent command
line is printed and recorded, so any arm reruns alone with ``python -m train.main``. Every arm of a
study sees the same data in the same order (``data.seed``); ``seed`` varies only the initialisation
(``train.seed``), the extra seeds measure the noise between two runs of the same arm.

Outputs in ``<root>``: ``study.jsonl`` (one JSON line per arm and seed: overrides, command, wall time,
the trainer's summary and the study's numbers) and ``table.md`` (the same as a markdown table).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
from absl import flags, logging

from tools.plot import read_metrics

DEFAULT_CONFIG = "configs/study_tiny.py"


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict  # dotted config field -> value, e.g. {"model.mtp_depth": 0}
    config_file: str | None = None  # None: the study's; "file.py:arg" passes arg to get_config


def load_config(config_file: str, overrides: dict):
    """``get_config()`` of ``config_file`` (``get_config(arg)`` for ``file.py:arg``, as train.main),
    locked (a misspelled field is a KeyError), with ``overrides``."""
    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides)
    return config


def command(config_file: str, workdir: Path, overrides: dict) -> str:
    flags = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    return f"python -m train.main --config={config_file} --workdir={workdir} {flags}".strip()


def _finished_with(workdir: Path, config) -> bool:
    """Whether ``workdir`` holds a finished study run of exactly ``config`` (``config.json`` as the
    trainer wrote it, ``train/provenance.py``)."""
    files = [workdir / n for n in ("summary.json", "config.json", "study_wall.json")]
    if not all(f.is_file() for f in files):
        return False
    want = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    return json.loads(files[1].read_text()) == want


def run_arms(
    arms: list[Arm],
    root,
    *,
    seeds=(0,),
    config_file: str = DEFAULT_CONFIG,
    common: dict | None = None,
    reuse: bool = False,
):
    """Train every arm at every seed (``common`` overrides first, e.g. ``train.steps``) -> records:
    dicts with name, seed, overrides, command, wall_s, summary, config (the resolved one) and rows
    (the run's metric lines, not written to the table). ``reuse``: keep an arm's finished run when
    its workdir holds one of the same resolved config (e.g. to add a seed), else train afresh."""
    root = Path(root)
    from train.trainer import train_and_evaluate  # jax starts here, after flag parsing

    logging.set_verbosity(logging.WARNING)  # as train.main: orbax logs every checkpoint operation at INFO

    records = []
    for seed in seeds:
        for arm in arms:
            overrides = {**(common or {}), **arm.overrides, "train.seed": seed}
            name = arm.name if seed == 0 else f"{arm.name}-s{seed}"
            workdir = root / name
            arm_config = arm.config_file or config_file
            config = load_config(arm_config, overrides)
            cmd = command(arm_config, workdir, overrides)
            if reuse and _finished_with(workdir, config):
                print(f"[study] {name}: reusing the finished run in {workdir} (same config)", flush=True)
                summary = json.loads((workdir / "summary.json").read_text())
                wall = json.loads((workdir / "study_wall.json").read_text())["wall_s"]
            else:
                shutil.rmtree(workdir, ignore_errors=True)  # otherwise an arm always trains from scratch
                print(f"[study] {name}: {cmd}", flush=True)
                t0 = time.perf_counter()
                summary = train_and_evaluate(config, str(workdir))
                wall = time.perf_counter() - t0
                (workdir / "study_wall.json").write_text(json.dumps({"wall_s": wall}))
            print(f"[study] {name}: final eval loss {summary['final_eval_loss']:.4f} in {wall:.0f} s", flush=True)
            records.append(
                dict(
                    name=arm.name,
                    seed=seed,
                    overrides=overrides,
                    command=cmd,
                    wall_s=wall,
                    summary=summary,
                    config=config,
                    rows=read_metrics(workdir),
                )
            )
    return records


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over the lines that have it."""
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def run_study(arms, summarise, verdict, plot, title: str, columns, root, plot_path, *, complete=True, **run_kw):
    """``run_arms`` (``run_kw``: seeds, config_file, common, reuse), then ``summarise(records)`` ->
    records with the study's numbers, the table with ``verdict(records)`` (when ``complete``: every
    arm ran) and ``plot(records, plot_path)``. Returns the records."""
    records = summarise(run_arms(arms, root, **run_kw))
    write_table(root, records, columns, title, note=verdict(records) if complete else "")
    plot(records, plot_path)
    return records


def write_table(root, records: list[dict], columns: list[tuple[str, str, str]], title: str, note: str = "") -> str:
    """``study.jsonl`` and ``table.md`` in ``root``; ``columns``: (record key, header, format) of the
    markdown table between the arm and seed and the wall time (the JSON lines hold every key but
    ``rows`` and ``config``), ``note`` below it (the study's verdict, also the last JSON line).
    Returns the markdown."""
    columns = [("name", "arm", ""), ("seed", "seed", ""), *columns, ("wall_s", "wall (s)", ".0f")]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "study.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps({k: v for k, v in r.items() if k not in ("rows", "config")}, default=float) + "\n")
        if note:
            fh.write(json.dumps({"verdict": note}) + "\n")
    lines = [f"**{title}**", "", "| " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for r in records:
        lines.append("| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |")
    md = "\n".join(lines + ([""] + [note] if note else [])) + "\n"
    (root / "table.md").write_text(md)
    print(md, flush=True)
    return md


def seed_spread(records: list[dict], key: str) -> dict:
    """Per arm name: (mean, max - min) of ``key`` over its seeds."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in records):
        vals = [r[key] for r in records if r["name"] == name]
        out[name] = (float(np.mean(vals)), float(np.max(vals) - np.min(vals)))
    return out


def parse_overrides(items: list[str]) -> dict:
    """["model.d_model=32", "train.steps=2"] -> {"model.d_model": 32, "train.steps": 2} (Python literals, else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override={item!r}: expected field=value, e.g. train.steps=100")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def define_flags():
    """The flags every study takes (call once, at import of the study's module)."""
    if "seeds" in flags.FLAGS:
        return
    flags.DEFINE_string("runs", None, "Folder of the arms' workdirs and the table. Default: runs/study_<name>.")
    flags.DEFINE_string("png", None, "The plot's path. Default: docs/study_<name>.png.")
    flags.DEFINE_string("config", DEFAULT_CONFIG, "Base config file of every arm.")
    flags.DEFINE_list("seeds", ["0"], "Initialisation seeds (train.seed); every arm runs at each.")
    flags.DEFINE_multi_string("override", [], "field=value applied to every arm, e.g. train.steps=400.")
    flags.DEFINE_bool("reuse", False, "Keep arms' finished runs of the same config (e.g. adding a seed).")


def flag_values(name: str) -> dict:
    """Keyword arguments of a study's ``run`` from the flags."""
    f = flags.FLAGS
    return dict(
        root=f.runs or f"runs/study_{name}",
        plot_path=f.png or f"docs/study_{name}.png",
        config_file=f.config,
        seeds=[int(s) for s in f.seeds],
        common=parse_overrides(f.override),
        reuse=f.reuse,
    )
