"""Crash injection for the crash-safety tests (off unless the environment asks for it).

``NTL_DEBUG_CHECKPOINT_FAULT="rank:save:point[,...]"`` SIGKILLs ``rank`` at ``point`` of its
``save``-th checkpoint (1-based): ``fileN`` (before its N-th file), ``fileN.mid`` (half of it
written), ``fileN.done``, ``saved`` (all ranks done), ``manifest``, ``renamed``, ``latest``.
With the variable unset every ``hit`` is a set lookup that never matches.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

from .collectives import rank

FAULT_ENV = "NTL_DEBUG_CHECKPOINT_FAULT"


class Faults:
    """The fault points of one process, parsed from :data:`FAULT_ENV` (or ``spec``)."""

    def __init__(self, spec: Optional[str] = None):
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.points = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            rank_, save, point = item.split(":", 2)
            self.points.add((int(rank_), int(save), point))
        self.save_no = 0

    def wants(self, point: str) -> bool:
        return bool(self.points) and (rank(), self.save_no, point) in self.points

    def hit(self, point: str) -> None:
        if self.wants(point):
            print(f"[{FAULT_ENV}] rank {rank()} killed at {point} of save {self.save_no}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
