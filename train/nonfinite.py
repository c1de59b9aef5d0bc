"""Which checkpoint is good while steps go non-finite, and when to stop.

A step whose loss or gradient is non-finite is skipped (``train/step.py``), but skipping does not
heal a state that has already diverged (an update that overflowed the weights, a router bias gone
wild): then every later step is non-finite too. Hence the rules here:

* **Never save during a streak.** ``may_save()`` is False while the last step was non-finite, so
  the checkpoints written before the streak are never followed by diverged ones.
* **Know which checkpoint is good.** The checkpoint of step c holds the state after update c;
  the loss of step c itself was computed before that update, so it says nothing about it. Only
  a finite step after c (with no save in between) shows that the state of c is sound. ``verified``
  is the newest such checkpoint, ``unverified`` the newer one still waiting for its proof.
* **Keep both through a streak.** When a streak begins, both are protected from garbage
  collection (``Checkpointer.protect``; an async save that commits during the streak would
  otherwise collect the older, good one), until a later checkpoint is verified.
* **Stop after ``max_in_a_row``** consecutive non-finite steps with ``NonFiniteError``, whose
  message names the verified checkpoint (or says that none is), not merely the newest one.
"""

from __future__ import annotations


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class NonFiniteGuard:
    def __init__(self, ckpt, max_in_a_row: int, restored_step: int | None):
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.ckpt = ckpt
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = 0
        self.verified: int | None = None
        self.unverified: int | None = restored_step

    def may_save(self) -> bool:
        return self.in_a_row == 0

    def saved(self, step: int):
        self.unverified = step

    def after_step(self, step: int, finite: bool) -> str | None:
        """Records step ``step``; returns a log line for a non-finite one, raises after too many."""
        if finite:
            self.in_a_row = 0
            if self.unverified is not None:  # its state just produced a finite loss
                self.verified, self.unverified = self.unverified, None
                self.ckpt.protect([])
            return None
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.ckpt.protect([self.verified, self.unverified])
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive non-finite steps (last: {step}); stopping. "
                f"{self.good_checkpoint()}; lower optimizer.lr or check the data."
            )
        return f"update skipped ({self.in_a_row} in a row; no checkpoint is saved until a finite step)"

    def good_checkpoint(self) -> str:
        where = self.ckpt.directory
        if self.verified is not None:
            msg = f"The last good checkpoint is step {self.verified} in {where} (a finite step followed it)"
        else:
            msg = f"No checkpoint in {where} is known good (none was followed by a finite step)"
        if self.unverified is not None:
            msg += (
                f"; step {self.unverified} holds the state the non-finite steps started from "
                f"(possibly already diverged)"
            )
        return msg
