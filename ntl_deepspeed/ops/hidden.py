"""CE + NTL from hidden states and a vocab-sharded LM head, never materialising the logits.

The logits ``hidden @ weight_shard.T (+ bias)`` are computed one vocab block at a time: the
forward keeps only a running log-sum-exp per token; the number-token logits (``O(T x N_local)``)
and the label's logit come from small separate products. The statistics then go through the
same two collectives as the logits path (:mod:`.statistics`); the backward recomputes each block
and turns it straight into the gradients of the hidden states and of the weight shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..numbers import VocabShard
from .math import exp_shifted, row_shift
from .header import labels_fingerprint
from .statistics import (OpSpec, RowLabels, RowStatistics, combine, gradient_terms, label_rows,
                         save_for_backward, saved_tensors)

# (vocab columns per block, tokens per chunk). CPU: buffers that stay in cache; CUDA: fewer,
# larger GEMMs (launch count), [chunk, block] fp32 = 128 MiB.
DEFAULT_BLOCKING = {"cpu": (1024, 2048), "cuda": (4096, 8192)}


@dataclass(frozen=True)
class Blocking:
    """How the head is swept: vocab ``block`` columns x ``token_chunk`` tokens at a time, GEMM
    operands in ``gemm_dtype`` (accumulation and softmax statistics in fp32 regardless)."""

    block: int
    token_chunk: int
    gemm_dtype: torch.dtype

    @classmethod
    def build(cls, hidden: torch.Tensor, block: Optional[int], token_chunk: Optional[int],
              gemm_dtype: Optional[torch.dtype]) -> "Blocking":
        """``None`` picks the device's default; ``gemm_dtype=None`` is the input dtype on CUDA
        (tensor cores) and fp32 on CPU (which has no fast bf16/fp16 GEMM)."""
        default_block, default_chunk = DEFAULT_BLOCKING.get(hidden.device.type,
                                                            DEFAULT_BLOCKING["cuda"])
        block = default_block if block is None else block
        token_chunk = default_chunk if token_chunk is None else token_chunk
        check_blocking(block, token_chunk)
        if gemm_dtype is None:
            gemm_dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
        return cls(block, token_chunk, gemm_dtype)


def check_blocking(block_size: int, token_chunk: int) -> None:
    if block_size < 1 or token_chunk < 1:
        raise ValueError(f"block_size={block_size} and token_chunk={token_chunk} must be >= 1")


def _spans(length: int, step: int):
    for i0 in range(0, length, step):
        yield i0, min(length, i0 + step)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` for an fp32 ``out``; low-precision operands multiply as they are.
    In-place ``addmm_`` (``beta=0`` overwrites): DeepSpeed's flops profiler does not count it,
    so gradient GEMMs run inside a forward are not booked as forward work (the profiler
    estimates the backward as 2x the forward)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=1 if accumulate else 0)
    else:
        out.add_(a @ b) if accumulate else out.copy_(a @ b)


def _block_logits(h: torch.Tensor, weight, bias, c0: int, c1: int, blocking: Blocking):
    """fp32 logits of columns ``[c0, c1)`` for the chunk ``h`` (already in the GEMM dtype)."""
    z = (h @ weight[c0:c1].to(blocking.gemm_dtype).t()).float()
    return z if bias is None else z + bias[c0:c1].float()


class HiddenCENTL(torch.autograd.Function):
    """Per-token (CE, NTL, y-hat, mass, correct) from hidden states and a vocab-sharded head.

    Communication contract, over ``shard.group`` when it has more than one rank: forward exactly
    the two all-reduces of :mod:`.statistics` (one MAX, one SUM); backward none. The hidden-state
    gradient is this rank's partial sum over its vocab slice: as with Megatron's
    ColumnParallelLinear, the layer that produced ``hidden`` (its TP copy/region op) all-reduces
    it in its own backward. Work memory: one ``[chunk, block]`` fp32 block (twice in backward),
    ``[chunk, H]`` for the chunk's hidden states and their fp32 gradient, ``O(T x N_local)`` for
    the number logits. No host synchronisation unless ``spec.read_header``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels1d, shard: VocabShard, spec: OpSpec,
                blocking: Blocking):
        tokens, device = hidden.shape[0], hidden.device
        rows = label_rows(labels1d, shard, spec.ignore_index)
        w_num = weight.index_select(0, shard.number_ids).to(blocking.gemm_dtype)
        lse_local = torch.empty(tokens, device=device)
        zn = torch.empty(tokens, shard.number_ids.numel(), device=device)
        target = torch.empty(tokens, device=device)
        nonfinite = torch.zeros((), device=device) if spec.check_finite else None
        for t0, t1 in _spans(tokens, blocking.token_chunk):
            h = hidden[t0:t1].to(blocking.gemm_dtype)
            lse = torch.full((t1 - t0,), float("-inf"), device=device)
            for c0, c1 in _spans(weight.shape[0], blocking.block):
                z = _block_logits(h, weight, bias, c0, c1, blocking)
                if nonfinite is not None:
                    nonfinite += (~torch.isfinite(z)).sum()
                top = row_shift(z)
                block_lse = torch.log(exp_shifted(z, top, out=z).sum(-1)) + top.squeeze(1)
                lse = torch.logaddexp(lse, block_lse)
            lse_local[t0:t1] = lse
            zn[t0:t1] = (h @ w_num.t()).float()
            cols = rows.target_local[t0:t1]
            target[t0:t1] = (hidden[t0:t1].float() * weight.index_select(0, cols).float()).sum(-1)
            if bias is not None:
                zn[t0:t1] += bias.index_select(0, shard.number_ids).float()
                target[t0:t1] += bias.index_select(0, cols).float()
        target = torch.where(rows.in_shard, target, torch.zeros_like(target))
        labels_fp = labels_fingerprint(labels1d) if shard.parallel else None
        outputs, stats = combine(lse_local, zn, target, rows, shard, spec, nonfinite,
                                 labels_fp)
        ctx.shard, ctx.spec, ctx.blocking, ctx.has_bias = shard, spec, blocking, bias is not None
        no_bias = hidden.new_empty(0)
        return save_for_backward(ctx, (hidden, weight, no_bias if bias is None else bias, zn),
                                 outputs, rows, stats)

    @staticmethod
    def backward(ctx, g_ce, g_ntl, g_yhat, g_mass, _g_correct):
        (hidden, weight, bias, zn), rows, stats = saved_tensors(ctx)
        bias = bias if ctx.has_bias else None
        d_hidden, d_weight, d_bias = recompute_gradients(
            hidden, weight, bias, zn, rows, stats, (g_ce, g_ntl, g_yhat, g_mass), ctx.shard,
            ctx.spec, ctx.blocking)
        return (d_hidden, d_weight.to(weight.dtype), None if d_bias is None else
                d_bias.to(bias.dtype), None, None, None, None)


def recompute_gradients(hidden, weight, bias, zn, rows: RowLabels, stats: RowStatistics, grads,
                        shard: VocabShard, spec: OpSpec, blocking: Blocking):
    """Gradients of hidden (its dtype), weight and bias (fp32) for the per-token output
    gradients ``grads`` = (ce, ntl, y-hat, mass), recomputing every logits block from the saved
    statistics: one more head GEMM than the logits' own forward + backward."""
    terms = gradient_terms(grads, zn, rows, stats, shard, spec)
    sign = torch.where(terms.negative, -1.0, 1.0).unsqueeze(1)
    shift = terms.shift.unsqueeze(1)
    # the block loop treats every column alike; the number columns (number_grad instead)
    # and the label's column (-g_ce more) are corrected after it, in fp32
    corr_n = terms.number_grad - torch.exp(zn - shift) * sign
    label_coef = torch.where(rows.in_shard, -terms.g_ce, torch.zeros_like(terms.g_ce))
    w_num = weight.index_select(0, shard.number_ids).float()
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    d_bias = None if bias is None else torch.empty(bias.shape, dtype=torch.float32,
                                                   device=bias.device)
    in_place = hidden.dtype == torch.float32  # accumulate straight into the output
    for t0, t1 in _spans(max(hidden.shape[0], 1), blocking.token_chunk):  # >= 1: writes dW
        h = hidden[t0:t1].to(blocking.gemm_dtype)
        h32 = hidden[t0:t1].float()
        dh = d_hidden[t0:t1].zero_() if in_place else torch.zeros_like(h32)
        first = t0 == 0  # the first chunk writes dW / db, later ones accumulate
        for c0, c1 in _spans(weight.shape[0], blocking.block):
            g = _block_logits(h, weight, bias, c0, c1, blocking)
            exp_shifted(g, shift[t0:t1], out=g)
            g.mul_(sign[t0:t1])
            g_gemm = g.to(blocking.gemm_dtype)
            _mm_into(dh, g_gemm, weight[c0:c1].to(blocking.gemm_dtype), accumulate=True)
            _mm_into(d_weight[c0:c1], g_gemm.t(), h, accumulate=not first)
            if d_bias is not None:
                d_bias[c0:c1] = g.sum(0) if first else d_bias[c0:c1] + g.sum(0)
        cols, coef = rows.target_local[t0:t1], label_coef[t0:t1].unsqueeze(1)
        dh.addmm_(corr_n[t0:t1], w_num)
        dh.add_(coef * weight.index_select(0, cols).float())
        d_weight.index_add_(0, shard.number_ids, corr_n[t0:t1].t() @ h32)
        d_weight.index_add_(0, cols, coef * h32)
        if d_bias is not None:
            d_bias.index_add_(0, shard.number_ids, corr_n[t0:t1].sum(0))
            d_bias.index_add_(0, cols, coef.squeeze(1))
        if not in_place:
            d_hidden[t0:t1] = dh
    return d_hidden, d_weight, d_bias


def hidden_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      labels: torch.Tensor, shard: VocabShard, spec: OpSpec,
                      blocking: Blocking) -> Tuple[torch.Tensor, ...]:
    """Per-token outputs of :class:`HiddenCENTL`, shaped like ``labels``. Inputs are checked
    by the caller (:func:`ntl_deepspeed.ce_ntl`)."""
    outs = HiddenCENTL.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                             labels.reshape(-1).long(), shard, spec, blocking)
    return tuple(o.view(labels.shape) for o in outs)
