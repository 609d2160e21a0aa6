"""A worker must never outlive its launcher.

``watch_launcher()`` (called first thing in every worker):

* ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux): the kernel sends SIGTERM when the parent dies,
  even if the worker is stuck in C code (a collective);
* a daemon thread polls the parent chain once a second: under the ``deepspeed`` launcher the
  worker's parent is ``deepspeed.launcher.launch``, itself the child of the ``deepspeed`` runner.
  Killing the runner (SIGKILL: no chance to clean up) leaves ``launch`` and the workers running;
  the thread notices that the runner is gone (``launch`` was re-parented) and ends the worker,
  which makes ``launch`` stop the other workers and exit.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
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
