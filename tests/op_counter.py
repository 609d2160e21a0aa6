"""Count host synchronisations and dispatched aten ops while a function runs (test utility).

Host syncs are detected by :mod:`sync_counter` (the one implementation: Tensor methods that hand
a device value to Python, data-dependent-shape ops, blocking host-to-device copies); this module
gives it a call-style interface and adds a count of dispatched aten ops (below autograd, so
``backward()`` inside ``fn`` counts too).
"""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from sync_counter import SYNC_METHODS, counting_host_syncs  # noqa: F401  (re-exported)


def count_host_syncs(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return ``(result, count, details)``, ``details`` one string
    per sync point (what and where). Run ``backward()`` inside ``fn`` to count it too."""
    with counting_host_syncs() as log:
        result = fn(*args, **kwargs)
    return result, len(log), [str(s) for s in log.syncs]


class _CountMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return ``(result, count, per_op)``: the number of aten ops
    dispatched below autograd and a ``Counter`` of them by overload name."""
    mode = _CountMode()
    with mode:
        result = fn(*args, **kwargs)
    return result, sum(mode.ops.values()), mode.ops
