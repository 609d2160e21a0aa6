"""Vocab-parallel fused cross-entropy + number token loss.

Each tensor-parallel rank holds the logits of its vocab slice ``[start, end)``. Per token it
reduces its slice to a few numbers (log-sum-exp of all its logits, of its number-token logits,
exp-sums weighted by values and by distances to the label, the label's logit); two all-reduces
combine them; the backward pass needs nothing from other ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..checks import check_labels, check_shapes
from ..numbers import NumberVocab, partition_bounds
from .ntl_math import (REWEIGH_MARGIN, dot_product_loss, dot_product_loss_grad,
                       number_distance)

# Logits per chunk (fp32 scratch, 4 MiB): bounds memory beyond the gradient; measured on CPU,
# chunks that stay in cache beat 16 MiB ones by ~30 %.
CHUNK_ELEMENTS = 1 << 20
_HEADER_SLOTS = 4  # per rank, in the MAX all-reduce: start, end, non-finite count, error code
_ERR_WIDTH = 1.0
_FP32_EXACT = float(1 << 24)


@dataclass(frozen=True)
class OpSpec:
    """Static description of one call: what to compute and this rank's vocab slice."""

    kind: str                 # "was" | "mse" | "l1" | "huber" | "none" (CE, y-hat and mass only)
    reweigh: bool
    max_distance: float       # for reweigh
    squash: Optional[Tuple[float, float, float]]  # (factor, d_min, d_max) for WAS
    vocab_start: int
    vocab_end: int
    ignore_index: int
    check_finite: bool
    shard_ok: bool = True     # False: this rank's shard does not fit its claimed slice


def _row_chunks(rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _group_size_rank(group) -> Tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _scratch(z: torch.Tensor) -> torch.Tensor:
    """One fp32 chunk buffer reused across chunks: no allocation or page faults per chunk, and
    small enough (CHUNK_ELEMENTS) to stay in cache between the passes over it."""
    rows = min(z.shape[0], max(1, CHUNK_ELEMENTS // max(z.shape[1], 1)))
    return torch.empty(rows, z.shape[1], dtype=torch.float32, device=z.device)


def _local_statistics(z: torch.Tensor, number_ids: torch.Tensor, target_local: torch.Tensor,
                      has_target: torch.Tensor):
    """One pass over this rank's logits: (lse of all, number-token logits fp32, label logit)."""
    rows = z.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=z.device)
    buf = _scratch(z)
    for r0, r1 in _row_chunks(rows, z.shape[1]):
        chunk, b = z[r0:r1], buf[: r1 - r0]
        top = chunk.amax(-1, keepdim=True).float()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        torch.sub(chunk, top, out=b)  # promotes bf16/fp16 to fp32
        lse[r0:r1] = torch.log(b.exp_().sum(-1)) + top.squeeze(1)
    number_logits = z.index_select(1, number_ids).float()
    target = z.gather(1, target_local.unsqueeze(1)).squeeze(1).float()
    return lse, number_logits, torch.where(has_target, target, torch.zeros_like(target))


@dataclass
class RowLabels:
    """What each token's label means for this shard."""

    valid: torch.Tensor         # label != ignore_index
    in_shard: torch.Tensor      # the label's column is on this rank
    target_local: torch.Tensor  # that column (0 where not in_shard)
    is_number: torch.Tensor     # the label is a number token
    y: torch.Tensor             # its value (0 elsewhere)


def label_rows(labels1d: torch.Tensor, values: torch.Tensor, spec: OpSpec, width: int):
    valid = labels1d != spec.ignore_index
    in_shard = (valid & (labels1d >= spec.vocab_start)
                & (labels1d < min(spec.vocab_end, spec.vocab_start + width)))
    label_value = values[torch.where(valid, labels1d, 0)]
    is_number = valid & ~torch.isnan(label_value)
    return RowLabels(valid, in_shard, torch.where(in_shard, labels1d - spec.vocab_start, 0),
                     is_number, torch.where(is_number, label_value, torch.zeros_like(label_value)))


def combine_statistics(lse_local, zn, target, rows: RowLabels, number_values, spec: OpSpec,
                       group, nonfinite: float, vocab_size: int):
    """The two collectives and the per-token results, from this rank's local statistics:
    ``lse_local`` [T] (log-sum-exp of its logits), ``zn`` [T, N_local] (its number-token
    logits, fp32), ``target`` [T] (the label's logit where it is on this rank, else 0).
    Returns (outputs (ce, ntl, y-hat, mass, correct), row statistics for the backward)."""
    n = lse_local.shape[0]
    size, rank = _group_size_rank(group)
    ninf = torch.full((n,), float("-inf"), device=lse_local.device)
    nlse_local = torch.logsumexp(zn, -1) if zn.shape[1] else ninf
    nmax_local = zn.max(-1).values if zn.shape[1] else ninf

    header = torch.full((size, _HEADER_SLOTS), -1.0, device=lse_local.device)
    header[rank, 0], header[rank, 1] = spec.vocab_start, spec.vocab_end
    header[rank, 2] = min(nonfinite, _FP32_EXACT)
    header[rank, 3] = 0.0 if spec.shard_ok else _ERR_WIDTH
    maxed = torch.cat([lse_local, nlse_local, nmax_local, header.reshape(-1)])
    if size > 1:
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    _raise_on_bad_header(maxed[3 * n:].view(size, _HEADER_SLOTS), spec, vocab_size)
    big_lse, big_nlse, nmax = maxed[:n], maxed[n:2 * n], maxed[2 * n:3 * n]

    e = torch.exp(zn - big_nlse.unsqueeze(1))  # [T, N_local]
    # (e * v).sum, not e @ v: DeepSpeed's flops profiler over-counts matrix-vector products
    summed = torch.stack([
        torch.exp(lse_local - big_lse), target, e.sum(-1), (e * number_values).sum(-1),
        (e * number_distance(number_values, rows.y.unsqueeze(1), spec.squash)).sum(-1)
        if spec.kind == "was" else torch.zeros_like(target)])
    if size > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    exp_sum, target_all, number_sum, value_sum, distance_sum = summed.unbind(0)

    lse = big_lse + torch.log(exp_sum)
    ce = torch.where(rows.valid, lse - target_all, torch.zeros_like(lse))
    nlse = big_nlse + torch.log(number_sum)
    yhat = value_sum / number_sum
    mass = torch.exp(nlse - lse)
    if spec.kind == "was":
        base = distance_sum / number_sum
    elif spec.kind == "none":
        base = torch.zeros_like(yhat)
    else:
        base = dot_product_loss(spec.kind, yhat, rows.y)
    ntl = mass * base + REWEIGH_MARGIN * spec.max_distance * (1 - mass) if spec.reweigh else base
    ntl = torch.where(rows.is_number, ntl, torch.zeros_like(ntl))
    correct = rows.is_number & (target_all >= nmax)
    return (ce, ntl, yhat, mass, correct), (lse, nlse, yhat, base, mass)


@dataclass
class GradientTerms:
    """d loss / d logits = sign * exp(z - shift) on every column, except the number-token
    columns (``number_grad`` [T, N_local]) and the label's column (``label_grad``)."""

    shift: torch.Tensor
    negative: torch.Tensor       # rows whose common coefficient is negative
    full_coef: torch.Tensor      # that coefficient (times the softmax)
    number_grad: torch.Tensor
    g_ce: torch.Tensor           # label column = its value above minus g_ce


def gradient_terms(grads, zn, rows: RowLabels, number_values, stats, spec: OpSpec):
    lse, nlse, yhat, base, mass = stats
    zero = torch.zeros_like(lse)
    g_ce, g_ntl, g_yhat, g_mass = (zero if g is None else g.float() for g in grads)
    g_ntl = torch.where(rows.is_number, g_ntl, zero)
    g_ce = torch.where(rows.valid, g_ce, zero)
    # l = m * base + c (1 - m) when reweighing: dl = m dbase + (base - c) dm
    base_scale = mass if spec.reweigh else torch.ones_like(mass)
    g_mass_total = g_mass + (g_ntl * (base - REWEIGH_MARGIN * spec.max_distance)
                             if spec.reweigh else zero)
    full_coef = g_ce - g_mass_total * mass  # times softmax q_k on every column
    g_value = g_yhat + (g_ntl * base_scale * dot_product_loss_grad(spec.kind, yhat, rows.y)
                        if spec.kind not in ("was", "none") else zero)

    p = torch.exp(zn - nlse.unsqueeze(1))  # softmax over number tokens
    number_grad = torch.exp(zn - lse.unsqueeze(1)) * (full_coef + g_mass_total).unsqueeze(1)
    number_grad += p * (g_value.unsqueeze(1) * (number_values - yhat.unsqueeze(1)))
    if spec.kind == "was":
        d = number_distance(number_values, rows.y.unsqueeze(1), spec.squash)
        number_grad += p * ((g_ntl * base_scale).unsqueeze(1) * (d - base.unsqueeze(1)))
    # q_k * full_coef = +-exp(z_k - lse + log|full_coef|); full_coef == 0 -> shift +inf -> 0
    shift = lse - torch.log(full_coef.abs())
    return GradientTerms(shift, full_coef < 0, full_coef, number_grad, g_ce)


class VocabParallelCENTL(torch.autograd.Function):
    """Per-token CE, NTL, expected value y-hat and number-token mass from a vocab shard.

    Communication contract, over ``tp_group`` when it has more than one rank:
      forward:  exactly 2 collective calls -- one all-reduce(MAX) of ``[3 T + 4 P]`` floats
                (log-sum-exps, number max, shard-consistency header) and one all-reduce(SUM) of
                ``[5, T]`` floats (CE's and NTL's statistics travel together);
      backward: none -- gradients come from the saved logits and the reduced row statistics.
    Inputs are never modified; accumulation is fp32 for any logits dtype; the gradient has the
    logits' dtype. Extra memory: O(T x local number tokens) plus one chunk of CHUNK_ELEMENTS.
    """

    @staticmethod
    def forward(ctx, logits2d, labels1d, values, number_ids, number_values, spec: OpSpec, group):
        rows = label_rows(labels1d, values, spec, logits2d.shape[1])
        lse_local, zn, target = _local_statistics(logits2d, number_ids, rows.target_local,
                                                  rows.in_shard)
        nonfinite = float((~torch.isfinite(logits2d)).sum()) if spec.check_finite else 0.0
        outputs, stats = combine_statistics(lse_local, zn, target, rows, number_values, spec,
                                            group, nonfinite, values.numel())
        ctx.spec, ctx.rows = spec, rows
        ctx.save_for_backward(logits2d, number_ids, number_values, *stats)
        ctx.mark_non_differentiable(outputs[-1])
        return outputs

    @staticmethod
    def backward(ctx, g_ce, g_ntl, g_yhat, g_mass, _g_correct):
        z, number_ids, number_values, *stats = ctx.saved_tensors
        spec, rows = ctx.spec, ctx.rows
        zn = z.index_select(1, number_ids).float()
        terms = gradient_terms((g_ce, g_ntl, g_yhat, g_mass), zn, rows, number_values, stats,
                               spec)
        lse = stats[0]
        # the label's column: its number-column value or its softmax term, minus g_ce
        column_to_number = torch.full((z.shape[1],), -1, dtype=torch.long, device=z.device)
        column_to_number[number_ids] = torch.arange(number_ids.numel(), device=z.device)
        label_number = column_to_number[rows.target_local]
        q_label = torch.exp(z.gather(1, rows.target_local.unsqueeze(1)).squeeze(1).float() - lse)
        label_grad = torch.where(
            label_number >= 0,
            terms.number_grad.gather(1, label_number.clamp_min(0).unsqueeze(1)).squeeze(1)
            if number_ids.numel() else torch.zeros_like(lse),
            q_label * terms.full_coef) - terms.g_ce
        number_grad, shift, in_shard, target_local = (terms.number_grad, terms.shift,
                                                      rows.in_shard, rows.target_local)

        # one subtraction and one exp per logit; exact fp32 values then overwrite the few others
        sign = torch.where(terms.negative, -1.0, 1.0).to(z.dtype)
        has_negative = terms.negative.tolist()  # only reweigh / g_mass make it negative
        grad = torch.empty_like(z)
        hit_rows = torch.nonzero(in_shard).squeeze(1)
        buf = None if z.dtype == torch.float32 else _scratch(z)
        for r0, r1 in _row_chunks(z.shape[0], z.shape[1]):
            out = grad[r0:r1]
            if buf is None:  # fp32: compute in the gradient itself
                torch.sub(z[r0:r1], shift[r0:r1].unsqueeze(1), out=out).exp_()
            else:  # fp32 in a cached scratch chunk, rounded once into the gradient's dtype
                b = torch.sub(z[r0:r1], shift[r0:r1].unsqueeze(1), out=buf[: r1 - r0])
                torch.exp(b, out=out)
            if any(has_negative[r0:r1]):
                out.mul_(sign[r0:r1].unsqueeze(1))
        grad.index_copy_(1, number_ids, number_grad.to(grad.dtype))
        grad[hit_rows, target_local[hit_rows]] = label_grad[hit_rows].to(grad.dtype)
        return grad, None, None, None, None, None, None


def _raise_on_bad_header(header: torch.Tensor, spec: OpSpec, vocab_size: int) -> None:
    """Every rank sees the same header after the MAX all-reduce, so all raise together."""
    for r, (start, end, nonfinite, err) in enumerate(header.tolist()):
        if err == _ERR_WIDTH:
            raise ValueError(f"tensor-parallel rank {r}: its logits shard does not fit the vocab "
                             f"slice [{int(start)}, {int(end)}) of a {vocab_size}-token vocab")
    bounds = [(int(s), int(e)) for s, e, _, _ in header.tolist()]
    if bounds[0][0] != 0 or bounds[-1][1] != vocab_size or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"vocab shards {bounds} do not partition [0, {vocab_size}) in rank order")
    bad = {r: int(n) for r, n in enumerate(header[:, 2].tolist()) if n > 0}
    if bad:
        raise ValueError(f"logits contain {sum(bad.values())} non-finite values "
                         f"(per tensor-parallel rank: {bad})")


def make_spec(vocab: NumberVocab, kind: str, reweigh: bool, squash_factor: Optional[float],
              vocab_start: int, vocab_end: int, ignore_index: int, check_finite: bool,
              shard_ok: bool = True) -> OpSpec:
    squash = (float(squash_factor), *vocab.distance_span()) if squash_factor is not None else None
    max_distance = vocab.max_distance(kind, squash_factor) if kind != "none" else 0.0
    return OpSpec(kind, reweigh, max_distance, squash, vocab_start, vocab_end, ignore_index,
                  check_finite, shard_ok)


def shard_bounds(vocab_size: int, width: int, group, vocab_start_index: Optional[int]):
    """This rank's claimed ``[start, end)``: from ``vocab_start_index`` and the shard width, or
    the even partition of the vocab by TP rank; and whether the shard fits that claim."""
    size, rank = _group_size_rank(group)
    if vocab_start_index is None:
        start, end = partition_bounds(vocab_size, size)[rank]
    else:
        start, end = int(vocab_start_index), int(vocab_start_index) + width
    return start, end, end - start == width and 0 <= start < end <= vocab_size


def vocab_parallel_statistics(logits: torch.Tensor, labels: torch.Tensor, vocab: NumberVocab,
                              kind: str, *, tp_group=None, reweigh: bool = False,
                              squash_factor: Optional[float] = None,
                              vocab_start_index: Optional[int] = None, ignore_index: int = -100,
                              check_finite: bool = False):
    """Per-token (ce, ntl, y-hat, number mass, number argmax correct), shaped like ``labels``.

    Problems local to one rank's shard are reported through the first collective, so every rank
    raises the same error instead of some ranks waiting forever."""
    check_shapes(logits, labels, None, "none")
    check_labels(labels, vocab.vocab_size, ignore_index)
    width = logits.shape[-1]
    start, end, shard_ok = shard_bounds(vocab.vocab_size, width, tp_group, vocab_start_index)
    if _group_size_rank(tp_group)[0] == 1 and (start, end, width) != (0, vocab.vocab_size,
                                                                     vocab.vocab_size):
        raise ValueError(f"logits have {width} vocab entries but the NumberVocab has "
                         f"{vocab.vocab_size} (shard [{start}, {end})); build it with "
                         f"vocab_size={width} or pass this shard's vocab_start_index")
    spec = make_spec(vocab, kind, reweigh, squash_factor, start, end, ignore_index, check_finite,
                     shard_ok)
    lo = min(max(start, 0), vocab.vocab_size - 1)
    values, number_ids, number_values = vocab.on_device(
        logits.device, lo, min(max(lo + width, lo + 1), vocab.vocab_size))
    if not shard_ok:  # keep indexing in bounds until the header makes every rank raise
        keep = number_ids < width
        number_ids, number_values = number_ids[keep], number_values[keep]
    outs = VocabParallelCENTL.apply(logits.reshape(-1, width), labels.reshape(-1).long(), values,
                                    number_ids, number_values, spec, tp_group)
    return tuple(o.view(labels.shape) for o in outs)
