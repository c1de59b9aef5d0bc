"""Entry point: ``python -m train.rl.main --config=configs/grpo_arith_tiny.py [--workdir=DIR] [--config.x.y=v]``.

The GRPO sibling of ``train/main.py`` (same flags and error handling): a bad input (config value,
task file, reward, checkpoint) ends the run with one line, ``error: ...``, and exit status 1
(``--traceback`` shows the traceback instead).
"""

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "GRPO config file (configs/grpo_*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (resumes if it holds checkpoints). Default: runs/<config>-<time>."
)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, show the Python traceback, not one line.")
flags.mark_flags_as_required(["config"])


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    workdir = _WORKDIR.value
    if workdir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", f"{name}-{stamp}")
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    from train.rl.trainer import grpo_train  # after flag parsing: jax starts here

    try:
        summary = grpo_train(config, workdir)
    except (ValueError, OSError, RuntimeError) as e:  # RewardError is a RuntimeError
        if _TRACEBACK.value:
            raise
        sys.exit(f"error: {type(e).__name__}: {e}")
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main)
