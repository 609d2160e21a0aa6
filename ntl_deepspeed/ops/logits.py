"""CE + NTL from this rank's logits shard ``[T, V_local]``: one pass forward, one pass backward.

Two interchangeable backends do the passes over the logits: ``torch`` (row chunks that stay in
CPU caches) and ``triton`` (one kernel launch per pass, for CUDA). The few number-token and label
columns are small torch ops in both.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..numbers import VocabShard
from .buffers import empty_huge_pages
from .math import exp_shifted, row_shift
from .header import labels_fingerprint
from .statistics import (GradientTerms, OpSpec, RowLabels, RowStatistics, combine, gradient_terms,
                         label_rows, save_for_backward, saved_tensors)

# Logits per chunk (fp32 scratch, 4 MiB): bounds memory beyond the gradient; measured on CPU,
# chunks that stay in cache beat 16 MiB ones by ~30 %.
CHUNK_ELEMENTS = 1 << 20


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: triton on CUDA when importable, else torch. ``triton`` on CPU tensors runs only
    in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported: tests)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'torch' or 'triton'")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from .triton_logits import triton_available  # guards its own triton import

    if triton_available(device):
        return "triton"
    if backend == "auto":
        return "torch"
    raise RuntimeError("backend='triton' needs the triton package on a GPU, or TRITON_INTERPRET=1 "
                       "(set before triton is imported) for CPU tensors")


# ---------------------------------------------------------------------- torch backend
def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _scratch(z: torch.Tensor) -> torch.Tensor:
    """One fp32 chunk buffer reused across chunks: no allocation or page faults per chunk, and
    small enough (CHUNK_ELEMENTS) to stay in cache between the passes over it."""
    rows = min(z.shape[0], max(1, CHUNK_ELEMENTS // max(z.shape[1], 1)))
    return torch.empty(rows, z.shape[1], dtype=torch.float32, device=z.device)


def _torch_row_statistics(z: torch.Tensor, target_local: torch.Tensor, in_shard: torch.Tensor,
                          count_nonfinite: bool):
    """(log-sum-exp of each row fp32, the label's logit fp32 (0 off-shard), non-finite count)."""
    lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    buf = _scratch(z)
    low_precision = z.dtype != torch.float32
    for r0, r1 in _row_chunks(z.shape[0], z.shape[1]):
        chunk, b = z[r0:r1], buf[: r1 - r0]
        if low_precision:  # one explicit conversion; mixed-dtype ops would copy per op
            chunk = b.copy_(chunk)
        top = row_shift(chunk)
        exp_shifted(chunk, top, out=b)  # in place for a converted chunk
        lse[r0:r1] = torch.log(b.sum(-1)) + top.squeeze(1)
    target = z.gather(1, target_local.unsqueeze(1)).squeeze(1).float()
    nonfinite = (~torch.isfinite(z)).sum() if count_nonfinite else None
    return lse, torch.where(in_shard, target, torch.zeros_like(target)), nonfinite


def _torch_write_gradient(z: torch.Tensor, shift: torch.Tensor, negative: torch.Tensor,
                          out: torch.Tensor) -> None:
    """``out = +-exp(z - shift)`` row by row, fp32 math, one rounding into ``out``'s dtype."""
    sign = torch.where(negative, -1.0, 1.0).unsqueeze(1)  # exact in any dtype
    buf = None if z.dtype == torch.float32 and out.dtype == torch.float32 else _scratch(z)
    for r0, r1 in _row_chunks(z.shape[0], z.shape[1]):
        o = out[r0:r1]
        if buf is None:  # fp32: compute in the gradient itself
            exp_shifted(z[r0:r1], shift[r0:r1].unsqueeze(1), out=o).mul_(sign[r0:r1])
        else:  # explicit conversions into and out of a cached fp32 chunk, one rounding
            b = buf[: r1 - r0].copy_(z[r0:r1])
            exp_shifted(b, shift[r0:r1].unsqueeze(1), out=b).mul_(sign[r0:r1])
            o.copy_(b)


def write_exact_columns(grad: torch.Tensor, terms: GradientTerms, label_logit: torch.Tensor,
                        rows: RowLabels, stats: RowStatistics, shard: VocabShard) -> None:
    """Overwrite the number-token columns and the label's column of ``grad`` (which holds the
    common term ``sign * exp(z - shift)`` everywhere) with their exact fp32 values;
    ``label_logit`` is the label's logit (fp32; any value where the label is off-shard)."""
    grad.index_copy_(1, shard.number_ids, terms.number_grad.to(grad.dtype))
    label_number = shard.column_to_number[rows.target_local]
    q_label = torch.exp(label_logit - stats.lse)
    label_grad = torch.where(
        label_number >= 0,
        terms.number_grad.gather(1, label_number.clamp_min(0).unsqueeze(1)).squeeze(1)
        if shard.number_ids.numel() else torch.zeros_like(q_label),
        q_label * terms.full_coef) - terms.g_ce
    every_row = torch.arange(grad.shape[0], device=grad.device)
    kept = grad[every_row, rows.target_local]  # rows whose label is elsewhere keep column 0
    grad.index_put_((every_row, rows.target_local),
                    torch.where(rows.in_shard, label_grad.to(grad.dtype), kept))


def _backend_passes(backend: str):
    if backend == "triton":
        from .triton_logits import row_statistics, write_gradient

        return row_statistics, write_gradient
    return _torch_row_statistics, _torch_write_gradient


# ---------------------------------------------------------------------- the autograd Function
class LogitsCENTL(torch.autograd.Function):
    """Per-token CE, NTL, y-hat, number mass and number-argmax from a vocab shard's logits.

    Communication contract, over ``shard.group`` when it has more than one rank (see
    :mod:`.statistics`): forward exactly 2 collectives in every mode -- one all-reduce(MAX) of
    ``[3 T + 9 P]`` floats, one all-reduce(SUM) of ``[6, T]`` floats; backward none. Inputs are never modified;
    accumulation is fp32 for any logits dtype; the gradient has the logits' dtype. Extra memory:
    O(T x local number tokens) plus one chunk of CHUNK_ELEMENTS (torch backend). No host
    synchronisation unless ``spec.read_header``.
    """

    @staticmethod
    def forward(ctx, logits2d, labels1d, shard: VocabShard, spec: OpSpec, backend: str):
        row_statistics, _ = _backend_passes(backend)
        rows = label_rows(labels1d, shard, spec.ignore_index)
        lse_local, target, nonfinite = row_statistics(logits2d, rows.target_local, rows.in_shard,
                                                      spec.check_finite)
        zn = logits2d.index_select(1, shard.number_ids).float()
        labels_fp = labels_fingerprint(labels1d) if shard.parallel else None
        outputs, stats = combine(lse_local, zn, target, rows, shard, spec, nonfinite,
                                 labels_fp)
        ctx.shard, ctx.spec, ctx.backend = shard, spec, backend
        return save_for_backward(ctx, (logits2d,), outputs, rows, stats)

    @staticmethod
    def backward(ctx, g_ce, g_ntl, g_yhat, g_mass, _g_correct):
        (z,), rows, stats = saved_tensors(ctx)
        shard, spec = ctx.shard, ctx.spec
        _, write_gradient = _backend_passes(ctx.backend)
        zn = z.index_select(1, shard.number_ids).float()
        terms = gradient_terms((g_ce, g_ntl, g_yhat, g_mass), zn, rows, stats, shard, spec)
        grad = empty_huge_pages(z.shape, z.dtype, z.device)
        label_logit = z.gather(1, rows.target_local.unsqueeze(1)).squeeze(1).float()
        write_gradient(z, terms.shift, terms.negative, grad)
        write_exact_columns(grad, terms, label_logit, rows, stats, shard)
        return grad, None, None, None, None


def logits_statistics(logits: torch.Tensor, labels: torch.Tensor, shard: VocabShard,
                      spec: OpSpec, backend: str = "auto") -> Tuple[torch.Tensor, ...]:
    """Per-token outputs of :class:`LogitsCENTL` (see :class:`~.statistics.PerToken`), shaped
    like ``labels``. Inputs are checked by the caller (:func:`ntl_deepspeed.ce_ntl`)."""
    width = logits.shape[-1]
    outs = LogitsCENTL.apply(logits.reshape(-1, width), labels.reshape(-1).long(), shard, spec,
                             resolve_backend(backend, logits.device))
    return tuple(o.view(labels.shape) for o in outs)
