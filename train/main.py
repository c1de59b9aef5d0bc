"""Entry point: ``python -m train.main --config=configs/moe_tiny.py [--workdir=DIR] [--config.x.y=v]``.

``--print_config`` prints the resolved config (overrides applied), every field with its comment,
in the spelling ``--config.x.y=v`` takes, and exits: ``python -m train.main
--config=configs/moe_tiny.py --print_config``.

Several processes (hosts): start the same command on each, with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or the env of ``train/distributed.py``; ``--distributed``
on Cloud TPU pod slices). All processes need the same ``--workdir`` (a shared disk or bucket).

A bad input (config file, a misspelled or mistyped ``--config.*`` override, config value, data,
tokenizer, checkpoint) ends the run with one line, ``error: ...``, and exit status 1
(``--traceback`` shows the Python traceback instead). A missing config file, a bad config value or
tokenizer are found before the workdir is created.
"""

import datetime
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (resumes if it holds checkpoints). Default: a fresh folder under ./runs."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() and let jax detect the cluster (Cloud TPU pod slices, SLURM, Open MPI).",
)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, show the Python traceback, not one line.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config",
    False,
    "Print the resolved config (after the --config.* overrides), every field with its comment, and exit.",
)
flags.mark_flags_as_required(["config"])

# Errors that name a bad input and need no traceback: config, data, tokenizer, checkpoint errors
# (CheckpointMismatchError is a ValueError, CorruptCheckpointError and NonFiniteError RuntimeErrors).
_USER_ERRORS = (ValueError, OSError, RuntimeError)


def _load_config():
    """The config, or exit with one line naming the file if it could not be read. (A config file
    that raises while it runs already failed during flag parsing, with its traceback.)"""
    config = _CONFIG.value
    try:
        config.get("train")  # config_flags defers a missing file's error to the first access
    except OSError as e:
        if _TRACEBACK.value:
            raise
        why = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        sys.exit(f"error: cannot read --config={flags.FLAGS['config'].config_filename}: {why}")
    return config


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with a one-line error for a bad flag or ``--config.*`` override (a misspelled
    field is a KeyError/AttributeError inside ml_collections, which absl lets through)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        why = str(e)
    except (AttributeError, KeyError) as e:  # --config.train.stepz=5
        if "--traceback" in argv:
            raise
        text = str(e).encode().decode("unicode_escape")
        field = re.search(r"'([^'\\]+)'", text)
        hint = re.search(r"Did you mean (.*?) instead", text)
        name = field.group(1) if field else "?"
        given = [
            a.split("=")[0] for a in argv if a.startswith("--config.") and re.search(rf"\.{re.escape(name)}([.=]|$)", a)
        ]
        why = f"{given[0] if given else '--config.*'}: the config has no field {name!r}"
        if hint:
            why += f" (did you mean {hint.group(1)}?)"
    sys.exit(f"error: {why}")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _load_config()  # before anything is created
    if _PRINT_CONFIG.value:
        from train.config_doc import format_config

        print(f"# --config={flags.FLAGS['config'].config_filename}, resolved\n" + format_config(config), end="")
        return
    workdir = _WORKDIR.value
    if workdir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", f"{name}-{stamp}")
    from train import distributed  # before any device is touched

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, force=_DISTRIBUTED.value)
    from train.paths import resolve

    print(f"workdir: {resolve(workdir)}", flush=True)
    from train.trainer import train_and_evaluate  # after flag parsing: jax starts here

    try:
        summary = train_and_evaluate(config, workdir)
    except _USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        sys.exit(f"error: {type(e).__name__}: {e}")
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
