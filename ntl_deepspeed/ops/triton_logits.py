"""Triton kernels for the logits path of the vocab-parallel CE+NTL op.

The torch path (:mod:`.logits`) walks a rank's logits shard in row chunks from Python,
so on CUDA its number of kernel launches grows with the number of tokens T. Here each of the two
logits passes is one launch, whatever T and the shard width W:

* :func:`row_statistics` -- forward: per row, log-sum-exp (online max and rescaled sum in fp32),
  the label's logit, and optionally the number of non-finite logits;
* :func:`write_gradient` -- backward: ``sign * exp(z - shift)`` into the gradient, computed in
  fp32 and rounded once to the gradient's dtype.

Inputs may be any 2-D strided view (e.g. row-strided slices); nothing is copied. The kernels are
device-agnostic Triton: they run on CUDA (or another Triton backend) and, on CPU tensors, only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported; slow, for
tests; triton builds its own library at import, so the variable must be set before triton is
first imported). This module imports without triton; check :func:`triton_available` first.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Optional, Tuple

import torch

try:  # optional dependency: the torch path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# Kernel launches by kernel name, for tests asserting the count does not grow with T or W.
LAUNCHES: Counter = Counter()

# Block shapes. Checked with ptxas for sm_80 (tests/test_triton_kernels.py compiles them on
# CPU): no spills; the forward's registers grow with rows per program (~50-70 up to 8 rows,
# ~96 at 16, 180+ at 32), so narrow rows are packed at most 8 to a program.
_STATS_MAX_W, _STATS_TILE, _STATS_MAX_T = 4096, 1024, 8   # forward: streams rows in W steps
_GRAD_MAX_W, _GRAD_TILE, _GRAD_MAX_T = 1024, 4096, 64     # backward: one tile per program
_MAX_GRID_Y = 65535           # CUDA's limit on grid axis 1 (axis 0 allows 2**31 - 1)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreted() -> bool:
    """True when the kernels can run in Triton's interpreter: TRITON_INTERPRET=1 was set both
    when triton was first imported (its own library, e.g. ``tl.max``, is built then) and when
    this module was."""
    return triton is not None and all(type(f).__name__ == "InterpretedFunction"
                                      for f in (tl.max, _row_statistics_kernel))


def triton_available(device=None) -> bool:
    """Whether the kernels can run on ``device`` (default: CUDA if present, else CPU): triton
    imports, and the device is a GPU or this module was imported in interpreter mode."""
    if triton is None:
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type != "cpu" or interpreted()


def _blocks(rows: int, width: int, max_w: int, tile: int, max_t: int) -> Tuple[int, int, int]:
    """(BLOCK_T, BLOCK_W, num_warps): wide rows get one row per program, narrow rows are packed
    several to a program (up to ``max_t``) so that a program still touches about ``tile``."""
    block_w = min(triton.next_power_of_2(max(width, 1)), max_w)
    block_t = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_w, max_t))
    return block_t, block_w, 8 if block_t * block_w >= 4096 else 4


def stats_blocks(rows: int, width: int, block_w: Optional[int] = None):
    """Launch configuration of :func:`row_statistics`."""
    return _blocks(rows, width, block_w or _STATS_MAX_W, _STATS_TILE, _STATS_MAX_T)


def gradient_blocks(rows: int, width: int, block_w: Optional[int] = None):
    """Launch configuration of :func:`write_gradient`."""
    block_t, bw, warps = _blocks(rows, width, block_w or _GRAD_MAX_W, _GRAD_TILE, _GRAD_MAX_T)
    while triton.cdiv(width, bw) > _MAX_GRID_Y:  # only for widths beyond 2**26
        bw *= 2
    return block_t, bw, warps


def _check(z: torch.Tensor, rows_args, name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name}: triton is not installed")
    if z.dim() != 2 or z.dtype not in _DTYPES:
        raise ValueError(f"{name}: expected 2-D fp32/fp16/bf16 logits, got {z.dtype} "
                         f"{tuple(z.shape)}")
    for label, t in rows_args:
        if t.shape != z.shape[:1] or t.device != z.device:
            raise ValueError(f"{name}: {label} must be [{z.shape[0]}] on {z.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if z.device.type == "cpu" and not interpreted():
        raise RuntimeError(f"{name}: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton and ntl_deepspeed.ops.triton_logits are first imported")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def row_statistics(z: torch.Tensor, target_local: torch.Tensor, has_target: torch.Tensor,
                   count_nonfinite: bool = False, *, block_w: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One pass over logits ``z`` [T, W]; returns ``(lse, target, nonfinite)``:

    * ``lse`` fp32 [T]: ``log(sum_k exp(z[t, k]))`` accumulated in fp32 around a shift of the
      row's max (0 when that max is not finite, as the torch path does): a row of -inf gives
      -inf, a row holding +inf gives +inf, one holding NaN gives NaN;
    * ``target`` fp32 [T]: ``z[t, target_local[t]]`` where ``has_target[t]``, else 0;
    * ``nonfinite``: int64 scalar tensor, the number of non-finite logits (``None`` unless
      ``count_nonfinite``); reading it is the caller's choice of host sync.

    ``target_local`` integer [T] (in ``[0, W)`` where ``has_target``), ``has_target`` bool
    [T]. One kernel launch on a grid of
    ``cdiv(T, BLOCK_T)`` programs, each streaming BLOCK_T rows in BLOCK_W-column steps;
    ``block_w`` (a power of two) caps BLOCK_W, for tests of the multi-step path.
    """
    _check(z, (("target_local", target_local), ("has_target", has_target)), "row_statistics")
    rows, width = z.shape
    lse = torch.empty(rows, dtype=torch.float32, device=z.device)
    target = torch.empty(rows, dtype=torch.float32, device=z.device)
    bad = torch.empty(rows if count_nonfinite else 1, dtype=torch.int32, device=z.device)
    if rows:
        block_t, bw, warps = stats_blocks(rows, width, block_w)
        with _on_device(z):
            _row_statistics_kernel[(triton.cdiv(rows, block_t),)](
                z, z.stride(0), z.stride(1), rows, width,
                target_local.contiguous(), has_target.contiguous().view(torch.uint8),
                lse, target, bad,
                COUNT_NONFINITE=count_nonfinite, BLOCK_T=block_t, BLOCK_W=bw, num_warps=warps)
        LAUNCHES["row_statistics"] += 1
    nonfinite = bad.sum(dtype=torch.int64) if count_nonfinite else None
    return lse, target, nonfinite


def write_gradient(z: torch.Tensor, shift: torch.Tensor, negative: torch.Tensor,
                   out: torch.Tensor, *, block_w: Optional[int] = None) -> torch.Tensor:
    """``out[t, k] = (-1 if negative[t] else 1) * exp(float(z[t, k]) - shift[t])`` for all t, k;
    0 on rows whose ``shift`` is +inf (zero coefficient), even where ``z`` is +inf.

    Computed in fp32, rounded once to ``out``'s dtype. ``z`` and ``out`` [T, W] (any strides;
    ``out`` may be ``z`` itself: each element is read before the same program writes it, but
    must not partially overlap it), ``shift`` fp32 [T], ``negative`` bool [T]. One kernel launch
    on a ``(cdiv(T, BLOCK_T), cdiv(W, BLOCK_W))`` grid, one tile per program. Returns ``out``.
    """
    _check(z, (("shift", shift), ("negative", negative)), "write_gradient")
    if out.shape != z.shape or out.dtype not in _DTYPES or out.device != z.device:
        raise ValueError(f"write_gradient: out must be [{z.shape[0]}, {z.shape[1]}] floating on "
                         f"{z.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    rows, width = z.shape
    if rows and width:
        block_t, bw, warps = gradient_blocks(rows, width, block_w)
        grid = (triton.cdiv(rows, block_t), triton.cdiv(width, bw))
        with _on_device(z):
            _gradient_kernel[grid](
                z, z.stride(0), z.stride(1), out, out.stride(0), out.stride(1),
                shift.float().contiguous(), negative.contiguous().view(torch.uint8), rows, width,
                BLOCK_T=block_t, BLOCK_W=bw, num_warps=warps)
        LAUNCHES["write_gradient"] += 1
    return out


if triton is not None:

    @triton.jit
    def _row_statistics_kernel(z_ptr, stride_t, stride_w, T, W,
                               label_ptr, has_label_ptr, lse_ptr, label_logit_ptr, bad_ptr,
                               COUNT_NONFINITE: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_W: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        # int64: rows * stride passes 2**31 at e.g. 16k tokens x 128k vocab
        row_ptr = z_ptr + rows.to(tl.int64) * stride_t
        top = tl.full([BLOCK_T], float("-inf"), tl.float32)   # running max
        shift = tl.zeros([BLOCK_T], tl.float32)               # top if finite, else 0
        total = tl.zeros([BLOCK_T], tl.float32)               # sum exp(z - shift)
        bad = tl.zeros([BLOCK_T], tl.int32)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            mask = row_ok[:, None] & (cols < W)[None, :]
            x = tl.load(row_ptr[:, None] + cols.to(tl.int64)[None, :] * stride_w, mask=mask,
                        other=float("-inf")).to(tl.float32)
            top = tl.maximum(top, tl.max(x, axis=1))
            # a non-finite max would make exp(x - shift) NaN for every x: shift by 0 instead,
            # so -inf rows sum to 0 (lse -inf) and +inf/NaN propagate as in torch
            new_shift = tl.where(tl.abs(top) < float("inf"), top, 0.0)
            # the shift only falls when nothing finite was summed yet (total 0, and 0 * exp(big)
            # would be NaN) or the max turned +inf (total becomes +inf anyway): rescale by <= 1
            rescale = tl.exp(tl.minimum(shift - new_shift, 0.0))
            total = total * rescale + tl.sum(tl.exp(x - new_shift[:, None]), axis=1)
            shift = new_shift
            if COUNT_NONFINITE:
                finite = tl.abs(x) < float("inf")  # False for +-inf and NaN
                bad += tl.sum((mask & ~finite).to(tl.int32), axis=1)
        tl.store(lse_ptr + rows, tl.log(total) + shift, mask=row_ok)
        if COUNT_NONFINITE:
            tl.store(bad_ptr + rows, bad, mask=row_ok)
        label = tl.load(label_ptr + rows, mask=row_ok, other=0)
        has = tl.load(has_label_ptr + rows, mask=row_ok, other=0) != 0
        logit = tl.load(row_ptr + label.to(tl.int64) * stride_w, mask=row_ok & has, other=0.0)
        tl.store(label_logit_ptr + rows, logit.to(tl.float32), mask=row_ok)

    @triton.jit
    def _gradient_kernel(z_ptr, z_stride_t, z_stride_w, out_ptr, out_stride_t, out_stride_w,
                         shift_ptr, negative_ptr, T, W,
                         BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = (tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols < W)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(z_ptr + rows64[:, None] * z_stride_t + cols[None, :] * z_stride_w,
                    mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
        negative = tl.load(negative_ptr + rows, mask=row_ok, other=0) != 0
        g = tl.exp(x - shift[:, None])
        g = tl.where((shift == float("inf"))[:, None], 0.0, g)  # zero coefficient: exactly 0
        g = tl.where(negative[:, None], -g, g)
        tl.store(out_ptr + rows64[:, None] * out_stride_t + cols[None, :] * out_stride_w,
                 g.to(out_ptr.dtype.element_ty), mask=mask)
