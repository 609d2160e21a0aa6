"""Count the points where the host would wait for the device (test utility for test_host_syncs).

A host sync is a place where Python needs a value computed on the device:

* ``Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__`` (``if t:``, ``int(t)``,
  ``float(t)``, ``range(t)``, ``t.tolist()``), counted once each -- the
  ``aten._local_scalar_dense`` they dispatch is not counted again;
* aten ops whose output shape or result depends on the data: ``_local_scalar_dense`` (called
  directly), ``nonzero``, ``masked_select``, ``unique*``, ``index.Tensor`` / ``index_put_`` with
  a boolean index, ``repeat_interleave`` without ``output_size``.

On CPU nothing actually waits, but the same code on CUDA would stall there, so counting on CPU
catches them. The ops are seen below autograd (a ``TorchDispatchMode``), so a ``backward()``
run inside the block counts too. Each record keeps the Python stack at the offending op, for a
report that says which line of which file caused it.

Kept apart in ``log.host_to_device``: copies that CUDA makes *blocking* (``cudaMemcpy`` then
``cudaStreamSynchronize``, so the host waits for all queued work) although no value comes back:
``torch.tensor(data, device=...)`` and a Python number stored into a single element,
``t[i] = 5`` (``copy_`` from a freshly lifted CPU scalar; ``t[i:j] = 5`` is a fill kernel, no
copy). On CPU they are recognised by the ``aten.lift_fresh`` that turns Python data into a
tensor.
"""
from __future__ import annotations

import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
_ALWAYS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim,
           aten._unique, aten._unique2, aten.unique_consecutive, aten.unique_dim_consecutive}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

_local = threading.local()  # > 0 while a counted Tensor method runs on this thread
_TENSOR_FACTORIES = ("tensor", "as_tensor")  # torch.<name>(data, device=...)


@dataclass
class Sync:
    what: str
    stack: List[traceback.FrameSummary]

    @property
    def where(self) -> str:
        """The innermost frame outside torch and this file, as ``file:line (code)``."""
        for frame in reversed(self.stack):
            name = frame.filename.replace("\\", "/")
            if "/torch/" not in name and not name.endswith("/sync_counter.py"):
                return f"{name}:{frame.lineno} ({frame.line})"
        return "?"

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"

    def format_stack(self) -> str:
        return "".join(traceback.format_list(self.stack))


@dataclass
class SyncLog:
    syncs: List[Sync] = field(default_factory=list)            # the device -> host reads
    host_to_device: List[Sync] = field(default_factory=list)   # blocking copies on CUDA

    def __len__(self) -> int:
        return len(self.syncs)

    def report(self, stacks: bool = True) -> str:
        lines = []
        for title, records in (("host sync(s)", self.syncs),
                               ("blocking host-to-device copies", self.host_to_device)):
            lines.append(f"{len(records)} {title}:")
            for s in records:
                lines.append(f"  {s}")
                if stacks:
                    lines.append(s.format_stack())
        return "\n".join(lines)


def _record(records: List[Sync], what: str) -> None:
    records.append(Sync(what, traceback.extract_stack()[:-2]))


def _is_bool_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _reason(func, args, kwargs):
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return str(func)
    if packet in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_bool_tensor(i) for i in indices or ()):
            return f"{func} with a boolean index"
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if func is aten.repeat_interleave.Tensor or len(tensors) == 2:  # repeats is a tensor
            return f"{func} without output_size"
    return None


class _Mode(TorchDispatchMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log
        self.lifted: List[torch.Tensor] = []  # tensors made from Python data in the block

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_local, "depth", 0) == 0:
            reason = _reason(func, args, kwargs)
            if reason is not None:
                _record(self.log.syncs, reason)
            if func is aten.copy_.default and any(args[1] is t for t in self.lifted):
                _record(self.log.host_to_device,
                        "aten.copy_ of a Python number into one element (t[i] = x)")
        out = func(*args, **kwargs)
        if func is aten.lift_fresh.default:
            self.lifted.append(out)
        return out


def _wrapped(name: str, original, log: SyncLog):
    def method(self, *args, **kwargs):
        if getattr(_local, "depth", 0) == 0:
            _record(log.syncs, f"Tensor.{name}")
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.depth -= 1

    method.__name__ = name
    return method


def _wrapped_factory(name: str, original, log: SyncLog):
    def factory(*args, **kwargs):
        if kwargs.get("device") is not None:
            _record(log.host_to_device, f"torch.{name}(data, device=...)")
        return original(*args, **kwargs)

    factory.__name__ = name
    return factory


@contextmanager
def counting_host_syncs():
    """``with counting_host_syncs() as log: ...`` -- ``len(log)`` syncs, ``log.report()``.

    The Tensor methods are shadowed on ``torch.Tensor`` (they live on its C base class) and
    restored in ``finally``."""
    log = SyncLog()
    own = {n: torch.Tensor.__dict__[n] for n in SYNC_METHODS if n in torch.Tensor.__dict__}
    factories = {n: getattr(torch, n) for n in _TENSOR_FACTORIES}
    try:
        for n in SYNC_METHODS:
            setattr(torch.Tensor, n, _wrapped(n, getattr(torch.Tensor, n), log))
        for n, original in factories.items():
            setattr(torch, n, _wrapped_factory(n, original, log))
        with _Mode(log):
            yield log
    finally:
        for n, original in factories.items():
            setattr(torch, n, original)
        for n in SYNC_METHODS:
            if n in own:
                setattr(torch.Tensor, n, own[n])
            else:
                delattr(torch.Tensor, n)
