"""Entry point: ``python -m train.main --config=configs/moe_tiny.py [--workdir=DIR] [--config.x.y=v]``.

Several processes (hosts): start the same command on each, with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or the env of ``train/distributed.py``; ``--distributed``
on Cloud TPU pod slices). All processes need the same ``--workdir`` (a shared disk or bucket).
"""

import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes if it holds checkpoints). "
                               "Default: a fresh folder under ./runs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let jax "
                                 "detect the cluster (Cloud TPU pod slices, SLURM, Open MPI).")
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
    from train import distributed  # before any device is touched
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, force=_DISTRIBUTED.value)
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    from train.trainer import train_and_evaluate  # after flag parsing: jax starts here
    summary = train_and_evaluate(_CONFIG.value, workdir)
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main)
