"""Entry point: ``python -m train.main --config=configs/moe_tiny.py [--workdir=DIR] [--config.x.y=v]``."""

import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes if it holds checkpoints). "
                               "Default: a fresh folder under ./runs.")
flags.mark_flags_as_required(["config"])


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = _WORKDIR.value
    if workdir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", f"{name}-{stamp}")
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    from train.trainer import train_and_evaluate  # after flag parsing: jax starts here
    summary = train_and_evaluate(_CONFIG.value, workdir)
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main)
