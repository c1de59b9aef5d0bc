"""Hugging Face DeepSeek checkpoints <-> our checkpoints.

  python -m tools.convert_hf import --hf-dir DIR --out CKPT [--dtype auto] [--scan_layers]
  python -m tools.convert_hf export --ckpt CKPT_OR_WORKDIR --out DIR [--max-shard-gb 4]

``import`` writes a weights-only checkpoint with ``train.checkpoint.Checkpointer``: step 0, state
``{"params", "rest"}`` (``nnx.split(model, nnx.Param, ...)``, as ``train/state.py``), meta
``{"model": dataclasses.asdict(cfg)}``. The weights are upcast to float32 (``param_dtype``): they are
the master weights of a fine-tuning run (DeepSeek-V3 report Sec. 3.3); ``--dtype`` is the compute
dtype. The trainer's ``train.init_checkpoint`` restores exactly
that, but only for a run whose ``config.model`` equals the checkpoint's. So ``import`` also writes
``CKPT/finetune_config.py``, a config file (``configs/base.py`` defaults, the converted model,
``train.init_checkpoint = CKPT``), and prints the command; every other field stays overridable:

  python -m train.main --config=CKPT/finetune_config.py --config.data.source='data/*.txt' \
      --config.data.tokenizer=DIR/tokenizer.json --config.train.steps=100

``export`` reads a weights-only checkpoint or a training workdir (its newest checkpoint under
``<workdir>/checkpoints``) and writes a directory transformers' ``DeepseekV3ForCausalLM``
loads (MTP modules included as ``model.layers.{N + k}.*``, which transformers ignores). It
refuses a non-empty ``--out`` (stale shards would mix with the new ones) and writes into a
temporary sibling that is renamed to ``--out`` when complete. Checkpoints are opened read-only:
reading a live training workdir changes nothing in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pprint
import shutil
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from model import hf
from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint import Checkpointer

_FINETUNE_CONFIG = '''"""Fine-tune the model converted by tools.convert_hf from {source}.

  python -m train.main --config={path} --config.data.source='data/*.txt'

configs/base.py defaults (preset {preset}) with config.model replaced by the converted model
(it must equal the checkpoint's, or the trainer refuses it) and train.init_checkpoint set.
"""

import ml_collections

from configs.base import build

MODEL = {model}


def get_config():
    c = build({preset!r})
    for k, v in MODEL.items():
        c.model[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
    c.train.init_checkpoint = {ckpt!r}
    return c
'''


# ---- reading our checkpoints ----


def _abstract_weights(cfg: ModelConfig):
    out = {}

    def make():
        graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        out["graphdef"] = graphdef
        return {"params": params, "rest": rest}

    shapes = jax.eval_shape(make)
    return out["graphdef"], shapes


def load_model(path: str) -> Transformer:
    """A weights-only checkpoint (``import``'s output) or a training workdir's newest checkpoint."""
    p = Path(path)
    workdir = (p / "checkpoints").is_dir()
    ckpt = Checkpointer(p / "checkpoints" if workdir else p, save_every=1, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt.directory}: no committed checkpoint")
        meta = ckpt.read_meta(step)
        cfg = ModelConfig.from_dict(meta["model"])
        if workdir:  # the full train state: its structure needs the run's optimizer
            from train.optimizer import make_optimizer
            from train.state import abstract_state

            config = ml_collections.ConfigDict(meta["config"])
            graphdef, abstract = abstract_state(
                cfg, make_optimizer(config.optimizer, config.train.steps), config.train.seed
            )
        else:
            graphdef, abstract = _abstract_weights(cfg)
        _, state, _, _ = ckpt.restore(abstract, expected_model=meta["model"])
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state["params"], state["rest"])


# ---- import / export ----


def import_hf(hf_dir: str, out: str, *, dtype: str = "auto", preset: str = "moe_tiny", **overrides) -> ModelConfig:
    """float32 parameters (upcast: training's master weights), compute ``dtype`` ("auto" = bf16 on
    GPU/TPU, f32 on CPU, resolved where the fine-tune config runs)."""
    model = hf.from_pretrained(hf_dir, dtype="float32", **overrides)
    cfg = model.cfg.replace(dtype=dtype)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    out = os.path.abspath(out)
    ckpt = Checkpointer(out, save_every=1, async_save=False)
    try:
        meta = {"model": dataclasses.asdict(cfg), "source": os.path.abspath(hf_dir)}
        if not ckpt.save(0, {"params": params, "rest": rest}, data_state={}, meta=meta, force=True):
            raise FileExistsError(f"{out} already holds a checkpoint; not overwriting it")
        ckpt.wait()
    finally:
        ckpt.close()
    cfg_file = os.path.join(out, "finetune_config.py")
    with open(cfg_file, "w") as fh:
        # Compute dtype as asked ("auto" unresolved); the kernel backend stays config.kernels.impl's.
        model_dict = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "kernels_impl"}
        model_dict["dtype"] = dtype
        fh.write(
            _FINETUNE_CONFIG.format(
                source=os.path.abspath(hf_dir),
                path=cfg_file,
                preset=preset,
                ckpt=out,
                model=pprint.pformat(model_dict, indent=4, sort_dicts=False),
            )
        )
    return cfg


def export_hf(ckpt: str, out: str, *, max_shard_bytes: int = 4 << 30) -> list[str]:
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {out} exists and is not an empty directory; export writes a fresh "
            f"one (stale shards would mix with the new): remove it or choose another"
        )
    model = load_model(ckpt)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        files = hf.save_pretrained(model, str(tmp), max_shard_bytes=max_shard_bytes)
        if out.exists():
            out.rmdir()  # empty (checked above); fails rather than clobber if something appeared since
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure
    return files


def _overrides(base: ModelConfig, cfg: ModelConfig) -> list[str]:
    """``--config.model.*`` flags turning preset ``base`` into ``cfg`` (yarn: whole-dict fields)."""
    flags = []
    for f in dataclasses.fields(cfg):
        a, b = getattr(base, f.name), getattr(cfg, f.name)
        if a == b:
            continue
        if f.name == "yarn" and a is not None and b is not None:
            flags += [f"--config.model.yarn.{k}={v}" for k, v in dataclasses.asdict(b).items()]
        elif f.name == "yarn":  # None <-> dict is not a command-line override
            flags.append("(yarn: not settable from flags on this preset; use finetune_config.py)")
        else:
            flags.append(f"--config.model.{f.name}={b}")
    return flags


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("import", help="Hugging Face dir -> weights-only checkpoint")
    im.add_argument("--hf-dir", required=True)
    im.add_argument("--out", required=True)
    im.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype of the fine-tune config (default auto: "
        "bf16 on GPU/TPU, f32 on CPU); parameters are always stored in float32",
    )
    im.add_argument("--preset", default="moe_tiny", help="configs.base preset the fine-tune config starts from")
    im.add_argument("--scan_layers", action="store_true", help="stack the MoE blocks (nnx.scan)")
    im.add_argument("--remat", default=None)
    ex = sub.add_parser("export", help="checkpoint or training workdir -> Hugging Face dir")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--max-shard-gb", type=float, default=4.0)
    args = ap.parse_args(argv)
    if args.cmd == "import":
        over = {"scan_layers": True} if args.scan_layers else {}
        if args.remat:
            over["remat"] = args.remat
        cfg = import_hf(args.hf_dir, args.out, dtype=args.dtype, preset=args.preset, **over)
        from model import presets

        out = os.path.abspath(args.out)
        print(f"wrote {out} (step 0: params + rest) and {out}/finetune_config.py")
        print(f"fine-tune with:\n  python -m train.main --config={out}/finetune_config.py --config.data.source='...'")
        flags = _overrides(presets.get(args.preset), cfg)
        print(
            f"or, with another config built on preset {args.preset}: --config.train.init_checkpoint={out} "
            + " ".join(flags)
        )
    else:
        try:
            files = export_hf(args.ckpt, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        except (FileExistsError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {args.out}: config.json + {len(files)} safetensors file(s)")


if __name__ == "__main__":
    main()
