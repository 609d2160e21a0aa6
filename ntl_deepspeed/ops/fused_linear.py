"""LM head + CE + NTL without materialising the logits (vocab-parallel, block by block).

The logits ``hidden @ weight_shard.T (+ bias)`` are computed one vocab block at a time: the
forward keeps only a running log-sum-exp per token; the number-token logits (``O(T x N_local)``)
and the label's logit come from small separate products. The statistics then go through the
same two collectives as :class:`~ntl_deepspeed.ops.vocab_parallel.VocabParallelCENTL`; the
backward recomputes each block and turns it straight into the gradients of the hidden states
and of the weight shard, communicating nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_labels, check_shapes
from ..config import NTLConfig
from ..loss import CENTLOutput, finish, token_kind
from ..numbers import NumberVocab
from .vocab_parallel import (_group_size_rank, combine_statistics, gradient_terms, label_rows,
                             make_spec, shard_bounds)

DEFAULT_BLOCK = 1024        # vocab columns per block
DEFAULT_TOKEN_CHUNK = 2048  # tokens per chunk: work buffers are [chunk, block] and [chunk, H]


def check_blocking(block_size: int, token_chunk: int) -> None:
    if block_size < 1 or token_chunk < 1:
        raise ValueError(f"block_size={block_size} and token_chunk={token_chunk} must be >= 1")


def _spans(length: int, step: int):
    for i0 in range(0, length, step):
        yield i0, min(length, i0 + step)


def _logits(h32, weight, bias, c0, c1):
    z = h32 @ weight[c0:c1].float().t()
    return z if bias is None else z + bias[c0:c1].float()


class FusedLinearCENTL(torch.autograd.Function):
    """Per-token (CE, NTL, y-hat, mass, correct) from hidden states and a vocab-sharded head.

    Communication contract, over ``tp_group`` when it has more than one rank: forward exactly the
    core op's 2 all-reduces (one MAX, one SUM); backward none. The hidden-state gradient is this
    rank's partial sum over its vocab slice: as with Megatron's ColumnParallelLinear, the layer
    that produced ``hidden`` (its TP copy/region op) all-reduces it in its own backward.
    Work memory: tokens go in chunks of ``token_chunk``, the vocab in blocks of ``block``: one
    ``[chunk, block]`` fp32 block (twice in backward), ``[chunk, H]`` fp32 for the chunk's
    hidden states and their gradient, ``O(T x N_local)`` for the number logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels1d, values, number_ids, number_values, spec,
                group, block, token_chunk):
        tokens = hidden.shape[0]
        rows = label_rows(labels1d, values, spec, weight.shape[0])
        w_num = weight.index_select(0, number_ids).float()
        b_num = None if bias is None else bias.index_select(0, number_ids).float()
        lse_local = torch.empty(tokens, device=hidden.device)
        zn = torch.empty(tokens, number_ids.numel(), device=hidden.device)
        target = torch.empty(tokens, device=hidden.device)
        nonfinite = 0.0
        for t0, t1 in _spans(tokens, token_chunk):
            h32 = hidden[t0:t1].float()
            lse = torch.full((t1 - t0,), float("-inf"), device=hidden.device)
            for c0, c1 in _spans(weight.shape[0], block):
                z = _logits(h32, weight, bias, c0, c1)
                if spec.check_finite:
                    nonfinite += float((~torch.isfinite(z)).sum())
                lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
            lse_local[t0:t1] = lse
            torch.mm(h32, w_num.t(), out=zn[t0:t1])
            cols = rows.target_local[t0:t1]
            target[t0:t1] = (h32 * weight.index_select(0, cols).float()).sum(-1)
            if bias is not None:
                zn[t0:t1] += b_num
                target[t0:t1] += bias.index_select(0, cols).float()
        target = torch.where(rows.in_shard, target, torch.zeros_like(target))
        outputs, stats = combine_statistics(lse_local, zn, target, rows, number_values, spec,
                                            group, nonfinite, values.numel())
        ctx.spec, ctx.rows, ctx.has_bias = spec, rows, bias is not None
        ctx.block, ctx.token_chunk = block, token_chunk
        ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0),
                              number_ids, number_values, zn, *stats)
        ctx.mark_non_differentiable(outputs[-1])
        return outputs

    @staticmethod
    def backward(ctx, g_ce, g_ntl, g_yhat, g_mass, _g_correct):
        hidden, weight, bias, number_ids, number_values, zn, *stats = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        rows, spec = ctx.rows, ctx.spec
        terms = gradient_terms((g_ce, g_ntl, g_yhat, g_mass), zn, rows, number_values, stats,
                               spec)
        sign = torch.where(terms.negative, -1.0, 1.0).unsqueeze(1)
        any_negative = bool(terms.negative.any())
        shift = terms.shift.unsqueeze(1)
        # the block loop treats every column alike; number columns get number_grad and the
        # label column also -g_ce, as corrections after it
        corr_n = terms.number_grad - torch.exp(zn - shift) * sign
        w_num = weight.index_select(0, number_ids).float()
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        d_bias = None if bias is None else torch.empty(bias.shape, dtype=torch.float32,
                                                       device=bias.device)
        in_place = hidden.dtype == torch.float32  # accumulate straight into the output
        for t0, t1 in _spans(max(hidden.shape[0], 1), ctx.token_chunk):  # >= 1 pass: writes dW
            h32 = hidden[t0:t1].float()
            dh = d_hidden[t0:t1].zero_() if in_place else torch.zeros_like(h32)
            for c0, c1 in _spans(weight.shape[0], ctx.block):
                g = _logits(h32, weight, bias, c0, c1).sub_(shift[t0:t1]).exp_()
                if any_negative:
                    g.mul_(sign[t0:t1])
                dh.addmm_(g, weight[c0:c1].float())
                if t0 == 0:  # the first chunk writes, later ones accumulate
                    torch.mm(g.t(), h32, out=d_weight[c0:c1])
                    if d_bias is not None:
                        torch.sum(g, 0, out=d_bias[c0:c1])
                else:
                    d_weight[c0:c1].addmm_(g.t(), h32)
                    if d_bias is not None:
                        d_bias[c0:c1] += g.sum(0)
            dh.addmm_(corr_n[t0:t1], w_num)
            d_weight.index_add_(0, number_ids, corr_n[t0:t1].t() @ h32)
            hit = torch.nonzero(rows.in_shard[t0:t1]).squeeze(1)
            cols, minus = rows.target_local[t0:t1][hit], -terms.g_ce[t0:t1][hit]
            dh.index_add_(0, hit, minus.unsqueeze(1) * weight.index_select(0, cols).float())
            d_weight.index_add_(0, cols, minus.unsqueeze(1) * h32[hit])
            if d_bias is not None:
                d_bias.index_add_(0, number_ids, corr_n[t0:t1].sum(0))
                d_bias.index_add_(0, cols, minus)
            if not in_place:
                d_hidden[t0:t1] = dh
        if d_bias is not None:
            d_bias = d_bias.to(bias.dtype)
        return (d_hidden, d_weight.to(weight.dtype), d_bias, None, None, None, None, None, None,
                None, None)


def fused_linear_ce_ntl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        number_vocab: NumberVocab, tp_group=None,
                        config: Optional[NTLConfig] = None, *, bias: Optional[torch.Tensor] = None,
                        vocab_start_index: Optional[int] = None, block_size: int = DEFAULT_BLOCK,
                        token_chunk: int = DEFAULT_TOKEN_CHUNK,
                        loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
                        dp_group=None, check_finite: bool = False, **overrides) -> CENTLOutput:
    """:func:`~ntl_deepspeed.vocab_parallel_ce_ntl` of ``hidden @ weight.T + bias`` without the
    logits: ``hidden`` [..., H], ``weight`` this rank's ``[V_local, H]`` rows of the head.
    Tokens are processed ``token_chunk`` at a time, the vocab ``block_size`` columns at a time."""
    import dataclasses

    config = dataclasses.replace(config or NTLConfig(), **overrides)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not "
                         "match: expected hidden [..., H] and labels [...]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    check_blocking(block_size, token_chunk)
    check_shapes(hidden.new_empty(*labels.shape, 0), labels, loss_weights, reduction)
    check_labels(labels, number_vocab.vocab_size, config.ignore_index)
    width = weight.shape[0]
    start, end, shard_ok = shard_bounds(number_vocab.vocab_size, width, tp_group,
                                        vocab_start_index)
    if _group_size_rank(tp_group)[0] == 1 and (start, end, width) != (
            0, number_vocab.vocab_size, number_vocab.vocab_size):
        raise ValueError(f"the head has {width} rows but the NumberVocab {number_vocab.vocab_size}"
                         f"; build it with vocab_size={width} or pass vocab_start_index")
    spec = make_spec(number_vocab, token_kind(config), config.reweigh, config.squash_factor,
                     start, end, config.ignore_index, check_finite, shard_ok)
    lo = min(max(start, 0), number_vocab.vocab_size - 1)
    values, number_ids, number_values = number_vocab.on_device(
        hidden.device, lo, min(max(lo + width, lo + 1), number_vocab.vocab_size))
    if not shard_ok:
        keep = number_ids < width
        number_ids, number_values = number_ids[keep], number_values[keep]
    outs = FusedLinearCENTL.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                  labels.reshape(-1).long(), values, number_ids, number_values,
                                  spec, tp_group, block_size, token_chunk)
    per_token = tuple(o.view(labels.shape) for o in outs)
    return finish(per_token, labels, number_vocab, config, loss_weights, reduction, dp_group)
