"""Count host synchronisations and dispatched aten ops while a function runs (test utility).

A host sync is a point where the CPU must wait for the device because Python needs a value
computed there: ``Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__``, and
aten ops whose output *shape* depends on the data (``nonzero``, ``masked_select``, boolean
indexing, ``unique``, ``repeat_interleave`` without ``output_size``, ...) or that return a
host value (``_local_scalar_dense``, ``equal``), plus device-to-host copies. On CPU nothing
actually waits, but the same code on CUDA would stall there; counting on CPU catches them early.

Ops are seen below autograd (a ``TorchDispatchMode``), so the backward pass counts too when
``loss.backward()`` runs inside ``fn``: the mode is thread-local state that the autograd engine
carries into the threads it runs backward on.
"""
from __future__ import annotations

import threading
import traceback
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Tensor methods that hand a device value to Python.
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

# Overload packets that always need the data on the host (output shape or a host scalar).
_ALWAYS_SYNC = {
    aten.nonzero, aten.masked_select, aten._local_scalar_dense, aten.equal, aten.bincount,
    aten.unique_dim, aten._unique, aten._unique2, aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
_BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_REPEAT_INTERLEAVE = aten.repeat_interleave

_state = threading.local()  # depth of counted Tensor methods on this thread


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _where() -> str:
    """The innermost caller outside torch and this module, as ``file:line``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and not f.endswith("/op_counter.py"):
            return f"{f}:{frame.lineno}"
    return "?"


def _is_bool(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_reason(func, args, kwargs):
    """Why ``func`` with these arguments needs the host to see device data, or None."""
    packet = func.overloadpacket
    if packet in _ALWAYS_SYNC:
        return str(func)
    if packet in _BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_bool(i) for i in indices or ()):
            return f"{func} (boolean index)"
    if packet is _REPEAT_INTERLEAVE:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if func is aten.repeat_interleave.Tensor:  # repeat_interleave(repeats) alone
            repeats = args[0]
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return f"{func} (no output_size)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst_device = (args[0].device if packet is aten.copy_
                      else kwargs.get("device") or src.device)
        if src.device.type != "cpu" and torch.device(dst_device).type == "cpu":
            return f"{func} (device to host)"
    return None


class _SyncMode(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _depth() == 0:  # inside Tensor.item & co. the method itself was counted
            reason = _sync_reason(func, args, kwargs)
            if reason is not None:
                self.log.append(f"{reason} at {_where()}")
        return func(*args, **kwargs)


class _CountMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _wrap(name, original, log):
    def method(self, *args, **kwargs):
        if _depth() == 0:
            log.append(f"Tensor.{name} at {_where()}")
        _state.depth = _depth() + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _state.depth -= 1

    method.__name__ = name
    return method


@contextmanager
def _patched_methods(log):
    """Temporarily replace the sync methods on ``torch.Tensor`` (they live on the C base class,
    so setting them on ``torch.Tensor`` shadows them; deleting restores)."""
    own = {n: torch.Tensor.__dict__[n] for n in SYNC_METHODS if n in torch.Tensor.__dict__}
    try:
        for n in SYNC_METHODS:
            setattr(torch.Tensor, n, _wrap(n, getattr(torch.Tensor, n), log))
        yield
    finally:
        for n in SYNC_METHODS:
            if n in own:
                setattr(torch.Tensor, n, own[n])
            else:
                delattr(torch.Tensor, n)


def count_host_syncs(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return ``(result, count, details)``, ``details`` one string
    per sync point (what and where). Run ``backward()`` inside ``fn`` to count it too."""
    log = []
    with _patched_methods(log), _SyncMode(log):
        result = fn(*args, **kwargs)
    return result, len(log), log


def count_dispatched_ops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return ``(result, count, per_op)``: the number of aten ops
    dispatched below autograd and a ``Counter`` of them by overload name."""
    mode = _CountMode()
    with mode:
        result = fn(*args, **kwargs)
    return result, sum(mode.ops.values()), mode.ops
