"""Hugging Face DeepSeek checkpoints <-> our checkpoints.

  python -m tools.convert_hf import --hf-dir DIR --out CKPT [--dtype auto] [--scan_layers]
  python -m tools.convert_hf export --ckpt CKPT_OR_WORKDIR --out DIR [--step N] [--tokenizer T] [--max-shard-gb 4]

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
``<workdir>/checkpoints``, or ``--step``'s) and writes a directory that transformers'
``AutoTokenizer`` and ``AutoModelForCausalLM`` load as is: ``config.json`` (with the run's
bos/eos/pad ids), ``generation_config.json``, the safetensors shards, and the tokenizer files
(``tools/hf_tokenizer.py``) of the run's ``data.tokenizer`` (a workdir) or of ``--tokenizer``
(``byte`` or a tokenizer.json; ``none`` writes none). Every file is world-readable (0644). The MTP
modules are written as ``model.layers.{N + k}.*`` (DeepSeek's layout, so the export keeps
everything the model has); transformers' ``DeepseekV3ForCausalLM`` has no MTP module and reports
those weights as unexpected when it loads the directory (it silences only ``model.layers.61.*``,
the 671B checkpoint's). It refuses a non-empty ``--out`` (stale
shards would mix with the new ones) and writes into a temporary sibling that is renamed to
``--out`` when complete. Checkpoints are opened read-only: reading a live training workdir changes
nothing in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def run_tokenizer(path: str) -> str:
    """The ``data.tokenizer`` of the run in workdir ``path`` ("byte" for a weights-only checkpoint)."""
    from etils import epath

    config = epath.Path(path) / "config.json"  # written by the trainer into its workdir (local or gs://)
    if (epath.Path(path) / "checkpoints").is_dir() and config.exists():
        return json.loads(config.read_text()).get("data", {}).get("tokenizer", "byte")
    return "byte"


def load_model(path: str, step: int | None = None) -> Transformer:
    """A weights-only checkpoint (``import``'s output) or a training workdir's newest checkpoint
    (``step``: that one)."""
    p = Path(path)
    workdir = (p / "checkpoints").is_dir()
    ckpt = Checkpointer(p / "checkpoints" if workdir else p, save_every=1, async_save=False, read_only=True)
    try:
        if step is None:
            step = ckpt.latest_step()
        elif step not in ckpt.committed_steps():
            raise FileNotFoundError(
                f"{ckpt.directory}: no committed checkpoint of step {step} (have {ckpt.committed_steps()})"
            )
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
        _, state, _, _ = ckpt.restore(abstract, expected_model=meta["model"], only_step=step)
    finally:
        ckpt.close()
    state = jax.device_put(state)  # orbax hands a weights-only checkpoint back as numpy arrays
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


def export_hf(
    ckpt: str, out: str, *, step: int | None = None, tokenizer: str | None = None, max_shard_bytes: int = 4 << 30
) -> list[str]:
    """Writes the Hugging Face directory ``out`` (module docstring); returns the safetensors file names.
    ``tokenizer``: ``data.tokenizer``'s vocabulary ("byte", a tokenizer.json), "none", or None = the run's."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {out} exists and is not an empty directory; export writes a fresh "
            f"one (stale shards would mix with the new): remove it or choose another"
        )
    tokenizer = run_tokenizer(ckpt) if tokenizer is None else tokenizer
    model = load_model(ckpt, step)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        special = {}
        if tokenizer != "none":
            from tools.hf_tokenizer import write_tokenizer

            special = write_tokenizer(tokenizer, str(tmp), model_max_length=model.cfg.max_seq_len)
            if max(special.values()) >= model.cfg.vocab_size:
                raise ValueError(f"tokenizer {tokenizer!r} has ids {special} beyond the model's {model.cfg.vocab_size}")
        files = hf.save_pretrained(model, str(tmp), max_shard_bytes=max_shard_bytes, extra_config=special)
        with open(tmp / "generation_config.json", "w") as fh:
            json.dump(special, fh, indent=2)  # greedy by default; bos/eos/pad as the run used them
        for f in tmp.iterdir():
            f.chmod(0o644)  # world-readable, whatever the umask: the directory is for others to load
        tmp.chmod(0o755)
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
    ex.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    ex.add_argument(
        "--tokenizer",
        default=None,
        help="byte | tokenizer.json (or its directory) | none (default: the run's data.tokenizer; byte for a "
        "weights-only checkpoint)",
    )
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
            files = export_hf(
                args.ckpt,
                args.out,
                step=args.step,
                tokenizer=args.tokenizer,
                max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
            )
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))} ({len(files)} safetensors file(s))")


if __name__ == "__main__":
    main()
