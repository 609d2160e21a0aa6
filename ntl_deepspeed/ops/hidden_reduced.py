"""The fused head for a reduced loss: its gradients come out of the forward sweep (3 head GEMMs).

When the caller differentiates the reduced loss, the gradient of every token's CE and NTL is a
known per-token coefficient (``d loss / d ce_t``, ``d loss / d ntl_t``: weights and counts, all
from the labels). So each token chunk's logits ``[chunk, V_local]`` are computed once into a
bounded fp32 buffer, reduced to the chunk's statistics (whose collectives then run per chunk),
turned in place into ``d loss / d logits`` and multiplied straight into the gradients of the
hidden states, the weight and the bias. The backward only scales those by the loss's
``grad_output``. Gradients of the other outputs (per-token CE / NTL / y-hat / mass) still work:
they go through the recomputing backward of :mod:`.hidden`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..numbers import VocabShard
from .math import exp_shifted, row_shift
from .buffers import empty_huge_pages
from .hidden import Blocking, _mm_into, _spans, recompute_gradients
from .logits import write_exact_columns
from .header import labels_fingerprint
from .statistics import (OpSpec, PerToken, RowLabels, RowStatistics, combine, gradient_terms,
                         label_rows, save_for_backward, saved_tensors)

# The chunk's logits buffer plus the hidden-state gradient stay within this fraction of the
# fp32 [T, V_local] logits (the materialised path holds them and their gradient: >= 2x that).
LOGITS_FRACTION = 0.065
# ... but the buffer may always hold this many fp32 elements (16 MiB): below that its memory
# does not matter, while every chunk costs fixed work (~30 small ops, two collectives under TP).
MIN_BUFFER_ELEMENTS = 4 * 2**20
# Fewer tokens per chunk re-read the weight shard (and dW) more often than the GEMMs pay for.
MIN_TOKEN_CHUNK = 64


def budget_token_chunk(tokens: int, width: int, hidden_size: int) -> int:
    """Tokens per chunk from the memory budget :data:`LOGITS_FRACTION` (or
    :data:`MIN_BUFFER_ELEMENTS`), at least :data:`MIN_TOKEN_CHUNK`, at most ``tokens``."""
    elements = max(LOGITS_FRACTION * tokens * width - tokens * hidden_size, MIN_BUFFER_ELEMENTS)
    return max(1, min(tokens, max(MIN_TOKEN_CHUNK, int(elements // max(width, 1)))))


def _fields(obj) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def _rows_of(rows: RowLabels, t0: int, t1: int) -> RowLabels:
    return RowLabels(*(x[t0:t1] for x in _fields(rows)))


class HiddenCENTLReduced(torch.autograd.Function):
    """:class:`.hidden.HiddenCENTL`'s outputs plus a zero scalar ``anchor`` that carries the
    gradient of ``sum_t coef_ce[t] * ce[t] + coef_ntl[t] * ntl[t]`` (the reduced loss), computed
    during the forward. Add ``anchor`` to the (detached) reduced loss.

    Communication (docs/API_CONTRACT.md#communication): the two all-reduces of
    :mod:`.statistics` once per token chunk (``ceil(T / token_chunk)`` chunks); backward none. The hidden-state gradient is
    this rank's partial sum over its vocab slice, as in :class:`.hidden.HiddenCENTL`. Work
    memory: one ``[token_chunk, V_local]`` fp32 buffer, the stored gradients (hidden: fp32
    ``[T, H]``; weight / bias: fp32, as the recomputing path returns them -- except the weight
    gradient of a low-precision weight when all tokens fit one chunk: stored in the weight's
    dtype, each block rounded once from its fp32 GEMM, and scaled by ``grad_output`` in that
    dtype, which rounds once more unless ``grad_output`` is a power of two, e.g. 1). No host
    synchronisation unless ``spec.read_header``. A second backward through the same graph
    (``retain_graph``) is refused: the stored gradients are scaled in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels1d, coef_ce, coef_ntl, shard: VocabShard,
                spec: OpSpec, blocking: Blocking):
        ctx.set_materialize_grads(False)
        tokens, device, width = hidden.shape[0], hidden.device, weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows = label_rows(labels1d, shard, spec.ignore_index)
        f32 = dict(dtype=torch.float32, device=device)
        per_token = PerToken(*(torch.empty(tokens, **f32) for _ in range(4)),
                             torch.empty(tokens, dtype=torch.bool, device=device))
        stats = RowStatistics(*(torch.empty(tokens, **f32) for _ in range(5)))
        zn = torch.empty(tokens, shard.number_ids.numel(), **f32)
        d_hidden = torch.empty(hidden.shape, **f32) if need_h else None
        # one token chunk and a low-precision weight: each vocab block's weight gradient is
        # final after its one GEMM, so it is stored in the weight's dtype at once (as the
        # backward returns it) -- no fp32 [V_local, H] buffer (at 128256 x 3072: 1.6 GB less,
        # and no 0.8 GB conversion in the backward)
        narrow_dw = (need_w and weight.dtype != torch.float32
                     and 0 < tokens <= blocking.token_chunk)
        if narrow_dw:
            d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
        else:
            d_weight = empty_huge_pages(weight.shape, **f32) if need_w else None
            if d_weight is not None and tokens == 0:  # else the first chunk overwrites it
                d_weight.zero_()
        d_bias = torch.zeros(width, **f32) if need_b else None
        gemm = blocking.gemm_dtype
        # operands already in the GEMM dtype: one GEMM over the whole shard; else converted
        # block by block (bounded memory)
        spans = [(0, width)] if weight.dtype == gemm else list(_spans(width, blocking.block))
        dw_block = (torch.empty(spans[0][1], weight.shape[1], **f32)  # a block's fp32 dW
                    if narrow_dw and weight.dtype != gemm else None)
        bias32 = None if bias is None else bias.float()
        buf = empty_huge_pages((min(blocking.token_chunk, tokens), width), **f32)
        for t0, t1 in _spans(tokens, blocking.token_chunk):
            h, z, r = hidden[t0:t1].to(gemm), buf[: t1 - t0], _rows_of(rows, t0, t1)
            for c0, c1 in spans:
                w = weight[c0:c1].to(gemm)
                if c1 - c0 == width and gemm == torch.float32:
                    torch.mm(h, w.t(), out=z)
                else:
                    z[:, c0:c1] = h @ w.t()
            if bias32 is not None:
                z.add_(bias32)
            nonfinite = (~torch.isfinite(z)).sum() if spec.check_finite else None
            zn_c = z.index_select(1, shard.number_ids)
            label_logit = z.gather(1, r.target_local.unsqueeze(1)).squeeze(1)
            target = torch.where(r.in_shard, label_logit, torch.zeros_like(label_logit))
            # one exp pass: z <- exp(z - row max); the gradient is a row scaling of it
            top = row_shift(z).squeeze(1)
            exp_shifted(z, top.unsqueeze(1), out=z)
            lse_local = torch.log(z.sum(-1)) + top
            labels_fp = labels_fingerprint(labels1d[t0:t1]) if shard.parallel else None
            out_c, stats_c = combine(lse_local, zn_c, target, r, shard, spec, nonfinite,
                                     labels_fp)
            for full, part in zip((*per_token, *_fields(stats), zn),
                                  (*out_c, *_fields(stats_c), zn_c)):
                full[t0:t1] = part
            if not (need_h or need_w or need_b):
                continue
            terms = gradient_terms((coef_ce[t0:t1], coef_ntl[t0:t1], None, None), zn_c, r,
                                   stats_c, shard, spec)
            # sign * exp(z - shift) = exp(z - top) * (sign * exp(top - shift))
            scale = torch.exp(top - terms.shift)
            z.mul_(torch.where(terms.negative, -scale, scale).unsqueeze(1))
            write_exact_columns(z, terms, label_logit, r, stats_c, shard)
            for c0, c1 in spans:
                g, w = z[:, c0:c1].to(gemm), weight[c0:c1].to(gemm)
                if need_h:
                    _mm_into(d_hidden[t0:t1], g, w, accumulate=c0 > 0)
                if dw_block is not None:  # the fp32 GEMM, rounded once to the weight's dtype
                    part = dw_block[: c1 - c0]
                    _mm_into(part, g.t(), h, accumulate=False)
                    d_weight[c0:c1] = part
                elif need_w:  # (a narrow d_weight with GEMMs in its dtype: one chunk, t0 = 0)
                    _mm_into(d_weight[c0:c1], g.t(), h, accumulate=t0 > 0)
            if need_b:
                d_bias += z.sum(0)
        ctx.shard, ctx.spec, ctx.blocking, ctx.has_bias = shard, spec, blocking, bias is not None
        ctx.consumed = False
        empty = hidden.new_empty(0)
        stored = tuple(empty if x is None else x for x in (bias, d_hidden, d_weight, d_bias))
        outputs = save_for_backward(ctx, (hidden, weight, zn, *stored), per_token, rows, stats)
        return (*outputs, torch.zeros((), **f32))

    @staticmethod
    def backward(ctx, g_ce, g_ntl, g_yhat, g_mass, _g_correct, g_anchor):
        if g_anchor is not None and ctx.consumed:
            raise RuntimeError("the fused head's gradients (computed in its forward) were "
                               "already used by a first backward; a second backward through "
                               "the same graph is not supported: run the forward again")
        (hidden, weight, zn, bias, d_hidden, d_weight, d_bias), rows, stats = saved_tensors(ctx)
        bias = bias if ctx.has_bias else None
        grads = [None, None, None]
        if g_anchor is not None:  # the reduced loss: scale the stored gradients in place
            ctx.consumed = True
            grads = [g.mul_(g_anchor) if need else None
                     for g, need in zip((d_hidden, d_weight, d_bias), ctx.needs_input_grad[:3])]
        per_token = (g_ce, g_ntl, g_yhat, g_mass)
        if any(g is not None for g in per_token):  # other outputs: the recomputing backward
            extra = recompute_gradients(hidden, weight, bias, zn, rows, stats, per_token,
                                        ctx.shard, ctx.spec, ctx.blocking)
            grads = [e if g is None else g.add_(e) for g, e in zip(grads, extra)]
        d_h, d_w, d_b = grads
        return (None if d_h is None else d_h.to(hidden.dtype),
                None if d_w is None else d_w.to(weight.dtype),
                None if d_b is None or bias is None else d_b.to(bias.dtype),
                None, None, None, None, None, None)


def reduced_hidden_statistics(hidden: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], labels: torch.Tensor,
                              coef_ce: torch.Tensor, coef_ntl: torch.Tensor, shard: VocabShard,
                              spec: OpSpec, blocking: Blocking):
    """``(per-token outputs shaped like labels, anchor)`` of :class:`HiddenCENTLReduced`."""
    *outs, anchor = HiddenCENTLReduced.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).long(),
        coef_ce.reshape(-1).float(), coef_ntl.reshape(-1).float(), shard, spec, blocking)
    return tuple(o.view(labels.shape) for o in outs), anchor
