"""``train.profile_steps = "A:B"``: a ``jax.profiler`` trace of training steps A+1 .. B.

The trace starts once step A has finished (after compilation when A >= 1) and stops when step B
has, its device work included, so the window holds B - A whole steps (like the slice ``[A:B]`` of
the 0-based step calls). It goes to ``<workdir>/profile/plugins/profile/<time>/``:
``<host>.xplane.pb`` (TensorBoard's profile tab: ``tensorboard --logdir <workdir>/profile`` with
``pip install -e ".[tensorboard]"``) and ``perfetto_trace.json.gz`` (open it at ui.perfetto.dev).
Every process writes its own host's files. A run that resumes past B traces nothing.
"""

from __future__ import annotations

import jax

PROFILE_DIR = "profile"


def parse_steps(spec: str | None) -> tuple[int, int] | None:
    """``"A:B"`` -> (A, B) with 0 <= A < B; None or "" -> None."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f'train.profile_steps={spec!r}: expected "A:B" with integers, e.g. "10:15"') from None
    if not 0 <= a < b:
        raise ValueError(f"train.profile_steps={spec!r}: need 0 <= A < B")
    return a, b


class StepProfiler:
    """Starts and stops the trace around the steps of ``parse_steps(spec)``; a no-op when unset."""

    def __init__(self, spec: str | None, workdir):
        self._window = parse_steps(spec)
        self._dir = str(workdir / PROFILE_DIR)
        self._on = False
        self.trace_dir = None

    def before_step(self, step: int) -> None:
        """Call before running step ``step + 1`` (``step`` steps are done)."""
        if self._window is not None and not self._on and self._window[0] <= step < self._window[1]:
            jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
            self._on = True

    def after_step(self, step: int, outputs=None) -> None:
        """Call once step ``step`` has run, with its outputs (waited for before the trace stops)."""
        if self._on and step >= self._window[1]:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self._on:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self._on = False
            self.trace_dir = self._dir
