"""A worker must never outlive its launcher, and a diverged run must stop loudly.

``watch_launcher()`` (called first thing in every worker):

* ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux): the kernel sends SIGTERM when the parent dies,
  even if the worker is stuck in C code (a collective);
* a daemon thread polls the parent chain once a second: under the ``deepspeed`` launcher the
  worker's parent is ``deepspeed.launcher.launch``, itself the child of the ``deepspeed`` runner.
  Killing the runner (SIGKILL: no chance to clean up) leaves ``launch`` and the workers running;
  the thread notices that the runner is gone (``launch`` was re-parented) and ends the worker,
  which makes ``launch`` stop the other workers and exit.

``Activity`` says what a rank is waiting for when it makes no progress: the trainer names what
it is doing (joining the process group, training step N, saving, evaluating); a daemon thread
prints a line when the same thing lasts longer than ``report_after`` seconds (a stalled rank, a
node that never started), and again at each further interval, until ``--dist-timeout`` ends it.

``DivergenceGuard`` counts consecutive non-finite losses (from the value the trainer already reads
once per step: no extra synchronisation).
"""
from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import threading
import time
from typing import List, Optional, Tuple

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _ppid_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid`` from /proc (None if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain() -> List[Tuple[int, int]]:
    """``[(pid, its parent pid)]`` of the ancestors to watch: the parent (always), and under
    DeepSpeed's per-node ``launch`` also the ``deepspeed`` runner above it."""
    parent = os.getppid()
    chain = [(os.getpid(), parent)]
    if "deepspeed.launcher.launch" in _cmdline(parent):
        grand = _ppid_of(parent)
        if grand and "deepspeed" in _cmdline(grand):
            chain.append((parent, grand))
        elif grand == 1:  # re-parented to init: the runner died before this worker looked
            chain.append((parent, _GONE))
    return chain


_GONE = -1


def _lost(chain: List[Tuple[int, int]]) -> Optional[str]:
    for pid, parent in chain:
        if parent == _GONE:
            return f"the deepspeed runner above {pid} exited before this worker started"
        now = os.getppid() if pid == os.getpid() else _ppid_of(pid)
        if now != parent:
            return f"process {parent} (parent of {pid}) is gone"
    return None


def watch_launcher(poll: float = POLL_SECONDS) -> threading.Thread:
    """Install the parent-death signal and start the watchdog thread (daemon)."""
    set_parent_death_signal(signal.SIGTERM)
    chain = launcher_chain()

    def run():
        while True:
            problem = _lost(chain)
            if problem:
                print(f"[rank {os.environ.get('RANK', '?')}] launcher died ({problem}): "
                      "stopping this worker", file=sys.stderr, flush=True)
                os._exit(143)
            threading.Event().wait(poll)

    thread = threading.Thread(target=run, name="ntl-launcher-watchdog", daemon=True)
    thread.start()
    return thread


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
