"""A diverged run must stop loudly: :class:`DivergenceGuard` counts consecutive non-finite
losses (from the value the trainer already reads once per step: no extra synchronisation)."""
from __future__ import annotations

import math
from typing import List, Optional


class TrainingDiverged(RuntimeError):
    """The loss was non-finite for too many consecutive steps."""


class DivergenceGuard:
    """Stops training after ``max_steps`` consecutive non-finite losses (0: never)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.streak: List[int] = []

    def update(self, step: int, loss: float, last_good_checkpoint: Optional[str]) -> bool:
        """Record this step's (reduced) loss; True when it is finite. Raises
        :class:`TrainingDiverged` at the ``max_steps``-th non-finite step in a row."""
        if math.isfinite(loss):
            self.streak = []
            return True
        self.streak.append(step)
        if self.max_steps and len(self.streak) >= self.max_steps:
            where = (f"the last good checkpoint is {last_good_checkpoint} (continue from it "
                     "with --resume, e.g. with a lower learning rate)"
                     if last_good_checkpoint else "no checkpoint was saved before it")
            raise TrainingDiverged(
                f"training diverged: the loss was non-finite ({loss}) for {len(self.streak)} "
                f"consecutive optimizer steps ({self.streak[0] + 1}..{step + 1}); {where}")
        return False
