"""Large CPU work buffers backed by transparent huge pages.

On Linux a fresh large allocation is mapped lazily, one 4 KiB page fault per page on first
write; for a logits-sized gradient those faults cost more than the arithmetic (measured on a
2-core VM: about half of the CE+NTL backward). Asking for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, what PyTorch's own allocator does under ``THP_MEM_ALLOC_ENABLE=1``)
before the first write cuts the faults 512-fold. Anything else (other OSes, devices, small
tensors, a refused madvise) is a plain ``torch.empty_like``.
"""
from __future__ import annotations

import ctypes
import sys

import torch

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * _HUGE_PAGE


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty_huge_pages(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(shape, dtype=, device=)``, on CPU advised to use huge pages when large."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type == "cpu" and _MADVISE is not None and out.nbytes >= _MIN_BYTES:
        start = (out.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)  # whole huge pages only
        end = (out.data_ptr() + out.nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out
