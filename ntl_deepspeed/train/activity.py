"""A rank that makes no progress says what it is waiting for.

The trainer names what it is doing (joining the process group, training step N, saving,
evaluating); a daemon thread prints a line when the same thing lasts longer than
``report_after`` seconds (a stalled rank, a node that never started), and again at each further
interval, until ``--dist-timeout`` ends it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional


class Activity:
    """What this rank is doing now, reported when it lasts too long (see the module docstring).
    ``now(what)`` is a host-side assignment: free in the training loop."""

    def __init__(self, timeout: float, report_after: Optional[float] = None,
                 rank: Optional[str] = None, out=None):
        self.timeout = timeout
        self.report_after = report_after if report_after is not None else \
            min(60.0, max(timeout / 3.0, 1.0))
        self.rank = rank if rank is not None else os.environ.get("RANK", "?")
        self.out = out if out is not None else sys.stderr
        self._what, self._since = None, 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ntl-activity", daemon=True)
        self.thread.start()

    def now(self, what: Optional[str]) -> None:
        """Doing ``what`` from now on (None: nothing to report, e.g. finished)."""
        self._what, self._since = what, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        reported = None
        while not self._stop.wait(min(1.0, self.report_after / 4)):
            what, since = self._what, self._since
            waited = time.monotonic() - since
            if what is None or waited < self.report_after:
                continue
            if reported == (what, since) and waited < self._next_report:
                continue
            reported, self._next_report = (what, since), waited + self.report_after
            print(f"[rank {self.rank}] no progress for {int(waited)} s: still {what}; if "
                  f"another rank is stalled or missing, the run fails after --dist-timeout "
                  f"{self.timeout:g} s", file=self.out, flush=True)
