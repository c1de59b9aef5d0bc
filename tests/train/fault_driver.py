"""A trainer process that SIGKILLs itself at one chosen point (driven by ``test_faults.py``).

  python -m tests.train.fault_driver WORKDIR CORPUS POINT

POINT (``none`` = run to the end):
  save:N    inside the async save of step N, in orbax's background thread (items half written)
  commit:N  the async save of step N is fully written but not yet committed (renamed)
  gc:N      while garbage-collecting step N: its commit marker is gone, part of it deleted
  restore   during the restore's checksum verification
  sigterm:N SIGTERM after step N (preemption); combine with save:N to die in the preemption save
Several points join with ``+``. Prints ``FIRST_STEP n`` at the first step it runs.
"""

import os
import shutil
import signal
import sys


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, corpus: str, points: str):
    import orbax.checkpoint as ocp
    from etils import epath
    from orbax.checkpoint._src.path import atomicity

    from tests.train.test_trainer import tiny
    from train import integrity
    from train.trainer import train_and_evaluate

    kinds = dict(p.split(":") if ":" in p else (p, "") for p in points.split("+") if p != "none")

    if "save" in kinds:
        real_save = ocp.JsonCheckpointHandler._save_fn

        async def save_fn(self, x, directory):
            if f"/{kinds['save']}.orbax-checkpoint-tmp" in str(directory):
                _die()
            return await real_save(self, x, directory)

        ocp.JsonCheckpointHandler._save_fn = save_fn
    if "commit" in kinds:
        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self._final_path.name == kinds["commit"]:
                _die()
            return await real_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    if "gc" in kinds:
        cls = type(epath.Path(workdir))
        real_rmtree = cls.rmtree

        def rmtree(self, *a, **kw):
            if self.name == kinds["gc"]:
                shutil.rmtree(os.path.join(self, "state"))  # a part is gone, then the process dies
                _die()
            return real_rmtree(self, *a, **kw)

        cls.rmtree = rmtree
    if "restore" in kinds:
        integrity.tree_checksums = lambda tree: _die()  # its first use is the restore's verification

    seen = []

    def on_step(step):
        if not seen:
            print(f"FIRST_STEP {step}", flush=True)
        seen.append(step)
        if kinds.get("sigterm") == str(step):
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny(corpus, steps=8, checkpoint_every=2, keep_checkpoints=1)
    train_and_evaluate(cfg, workdir, on_step=on_step)


if __name__ == "__main__":
    main(*sys.argv[1:4])
