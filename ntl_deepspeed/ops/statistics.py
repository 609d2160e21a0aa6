"""The communication contract of every CE+NTL op: per-token statistics and their two collectives.

Each tensor-parallel rank reduces its vocab slice to a few numbers per token (log-sum-exp of all
its logits, its number-token logits, the label's logit where it holds it). :func:`combine`
merges them with exactly two all-reduces over the shard's group -- one MAX (maxima and a
per-rank header that checks the shards fit together and that every rank has the same token
count, loss options, number vocabulary and labels, the same check mode, and whether each
passed its local input checks), one SUM (CE's and NTL's statistics travel together) -- and
returns the per-token results. The collectives are the same in every mode (``check_inputs`` /
``check_finite`` only decide whether the header is read on the host), so a rank whose options or
inputs differ still joins the first collective, and every rank raises the same error after it.
A rank that fails a check before the op (a shape) joins it through :func:`fail_together`
(the header, its fingerprints and checks: :mod:`.header`). The
token count sets the collectives' sizes: ranks with different counts are a collective mismatch
(gloo aborts the process; the labels must be identical on every rank).
:func:`gradient_terms` turns the saved statistics into the pieces of d loss / d logits; backward
communicates nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import NTLConfig
from ..numbers import VocabShard, label_targets
from .header import HEADER_SLOTS, build_header, check_header, options_fingerprint
from .math import (dot_product_loss, dot_product_loss_grad, number_distance, reweigh,
                   worst_loss)

PER_TOKEN_KINDS = ("was", "mse", "l1", "huber")
@dataclass(frozen=True)
class OpSpec:
    """What one call computes (static, from the config and the vocab)."""

    ntl_kind: Optional[str]   # a PER_TOKEN_KIND, or None: CE, y-hat and mass only (NTL off, or
    #                           number-level NTL, which the loss assembles from y-hat afterwards)
    reweigh: bool
    max_distance: float       # the worst per-token NTL, for reweigh
    squash: Optional[Tuple[float, float, float]]  # WAS: (factor, d_min, d_max)
    ignore_index: int
    check_finite: bool        # count non-finite logits (a host read)
    read_header: bool         # read the header on the host: precise errors, one sync
    fingerprint: float = 0.0  # of the options and the number vocab: equal on all TP ranks
    # this rank's local verdict (LOCAL_PROBLEMS bits), a 0-dim float on the device, or None:
    # set per call by the front door for tensor-parallel shards (see fail_together)
    verdict: Optional[torch.Tensor] = dataclasses.field(default=None, compare=False)

    @property
    def mode(self) -> float:
        """The check mode, which every rank of the group must share (else one rank would read
        a header the others only assert on)."""
        return float(self.read_header) + 2.0 * float(self.check_finite)

    @classmethod
    def build(cls, config: NTLConfig, shard: VocabShard) -> "OpSpec":
        kind = config.kind if config.enabled and config.kind in PER_TOKEN_KINDS else None
        vocab = shard.vocab
        squash = (config.squash_factor, *vocab.distance_span()) \
            if kind == "was" and config.squash_factor is not None else None
        max_distance = vocab.max_distance(config.kind, config.squash_factor) \
            if config.enabled and config.reweigh else 0.0
        return cls(kind, config.reweigh and config.enabled, max_distance, squash,
                   config.ignore_index, config.check_finite,
                   config.check_finite or config.check_inputs,
                   options_fingerprint(config, vocab))


class PerToken(NamedTuple):
    """The op's outputs, one value per token."""

    ce: torch.Tensor
    ntl: torch.Tensor     # 0 off number labels (and everywhere when ntl_kind is None)
    yhat: torch.Tensor    # expected value under the number-token softmax
    mass: torch.Tensor    # full-vocab probability on number tokens
    correct: torch.Tensor  # the label is the most likely number token (bool; strict: no ties)


@dataclass
class RowLabels:
    """What each token's label means for this shard."""

    valid: torch.Tensor         # label != ignore_index
    in_shard: torch.Tensor      # the label's column is on this rank
    target_local: torch.Tensor  # that column (0 where not in_shard)
    is_number: torch.Tensor     # the label is a number token
    y: torch.Tensor             # its value (0 elsewhere)


@dataclass
class RowStatistics:
    """Reduced per-token statistics the backward needs."""

    lse: torch.Tensor    # log-sum-exp over the whole vocab
    nlse: torch.Tensor   # log-sum-exp over the number tokens
    yhat: torch.Tensor
    base: torch.Tensor   # NTL before reweighing
    mass: torch.Tensor


def _astuple(obj) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def save_for_backward(ctx, inputs: tuple, outputs: PerToken, rows: RowLabels,
                      stats: RowStatistics) -> tuple:
    """Every tensor the backward needs goes through ``save_for_backward`` (so saved-tensor hooks
    and activation offloading see them all); returns the outputs for ``forward``."""
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(*inputs, *_astuple(rows), *_astuple(stats))
    ctx.mark_non_differentiable(outputs.correct)
    return tuple(outputs)


def saved_tensors(ctx):
    """``(inputs, RowLabels, RowStatistics)`` as :func:`save_for_backward` stored them."""
    saved, n, k = ctx.saved_tensors, ctx.n_inputs, len(dataclasses.fields(RowLabels))
    return saved[:n], RowLabels(*saved[n:n + k]), RowStatistics(*saved[n + k:])


def label_rows(labels1d: torch.Tensor, shard: VocabShard, ignore_index: int) -> RowLabels:
    valid, is_number, y = label_targets(labels1d, shard.values, ignore_index)
    in_shard = valid & (labels1d >= shard.start) & (labels1d < min(shard.end,
                                                                   shard.start + shard.width))
    return RowLabels(valid, in_shard, torch.where(in_shard, labels1d - shard.start, 0), is_number,
                     y)


def combine(lse_local: torch.Tensor, zn: torch.Tensor, target: torch.Tensor, rows: RowLabels,
            shard: VocabShard, spec: OpSpec, nonfinite: Optional[torch.Tensor],
            labels_fp: Optional[torch.Tensor] = None):
    """The two collectives and the per-token results, from this rank's local statistics:
    ``lse_local`` [T] (log-sum-exp of its logits), ``zn`` [T, N_local] (its number-token logits,
    fp32), ``target`` [T] (the label's logit where it is on this rank, else 0), ``nonfinite``
    (a scalar count, when ``spec.check_finite``), ``labels_fp`` (:func:`labels_fingerprint`).
    Returns ``(PerToken, RowStatistics)``."""
    n, values = lse_local.shape[0], shard.number_values
    ninf = torch.full((n,), float("-inf"), device=lse_local.device)
    nlse_local = torch.logsumexp(zn, -1) if zn.shape[1] else ninf
    nmax_local = zn.max(-1).values if zn.shape[1] else ninf

    header = build_header(shard, nonfinite, n, spec, labels_fp, lse_local.device)
    maxed = torch.cat([lse_local, nlse_local, nmax_local, header.reshape(-1)])
    if shard.parallel:
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=shard.group)
    check_header(maxed[3 * n:].view(shard.group_size, HEADER_SLOTS), shard, spec)
    big_lse, big_nlse, nmax = maxed[:n], maxed[n:2 * n], maxed[2 * n:3 * n]

    if zn.shape[1]:  # a number label's logit from its zn column: the values the max is taken
        # over (the fused head computes target and zn by different products, an ulp apart)
        label_number = shard.column_to_number[rows.target_local]
        from_zn = zn.gather(1, label_number.clamp_min(0).unsqueeze(1)).squeeze(1)
        target = torch.where(rows.in_shard & (label_number >= 0), from_zn, target)
    e = torch.exp(zn - big_nlse.unsqueeze(1))  # [T, N_local]
    # (e * v).sum, not e @ v: DeepSpeed's flops profiler over-counts matrix-vector products
    summed = torch.stack([
        torch.exp(lse_local - big_lse), target, e.sum(-1), (e * values).sum(-1),
        (e * number_distance(values, rows.y.unsqueeze(1), spec.squash)).sum(-1)
        if spec.ntl_kind == "was" else torch.zeros_like(target),
        (zn >= nmax.unsqueeze(1)).sum(-1).float()])  # number tokens at the maximum
    if shard.parallel:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=shard.group)
    exp_sum, target_all, number_sum, value_sum, distance_sum, at_max = summed.unbind(0)

    lse = big_lse + torch.log(exp_sum)
    ce = torch.where(rows.valid, lse - target_all, torch.zeros_like(lse))
    nlse = big_nlse + torch.log(number_sum)
    yhat = value_sum / number_sum
    mass = torch.exp(nlse - lse)
    if spec.ntl_kind == "was":
        base = distance_sum / number_sum
    elif spec.ntl_kind is None:
        base = torch.zeros_like(yhat)
    else:
        base = dot_product_loss(spec.ntl_kind, yhat, rows.y)
    ntl = reweigh(base, mass, spec.max_distance) if spec.reweigh else base
    ntl = torch.where(rows.is_number, ntl, torch.zeros_like(ntl))
    # the label alone at the maximum: a collapsed model (all logits equal) is not "correct"
    correct = rows.is_number & (target_all >= nmax) & (at_max == 1)
    return PerToken(ce, ntl, yhat, mass, correct), RowStatistics(lse, nlse, yhat, base, mass)


@dataclass
class GradientTerms:
    """d loss / d logits = sign * exp(z - shift) on every column, except the number-token
    columns (``number_grad`` [T, N_local]) and the label's column (``label_grad``)."""

    shift: torch.Tensor
    negative: torch.Tensor       # rows whose common coefficient is negative
    full_coef: torch.Tensor      # that coefficient (times the softmax)
    number_grad: torch.Tensor
    g_ce: torch.Tensor           # label column = its value above minus g_ce


def gradient_terms(grads, zn: torch.Tensor, rows: RowLabels, stats: RowStatistics,
                   shard: VocabShard, spec: OpSpec) -> GradientTerms:
    values = shard.number_values
    zero = torch.zeros_like(stats.lse)
    g_ce, g_ntl, g_yhat, g_mass = (zero if g is None else g.float() for g in grads)
    g_ntl = torch.where(rows.is_number, g_ntl, zero)
    g_ce = torch.where(rows.valid, g_ce, zero)
    # reweigh: l = m * base + c (1 - m), so dl = m dbase + (base - c) dm
    base_scale = stats.mass if spec.reweigh else torch.ones_like(stats.mass)
    g_mass_total = g_mass + (g_ntl * (stats.base - worst_loss(spec.max_distance)) if spec.reweigh else zero)
    full_coef = g_ce - g_mass_total * stats.mass  # times softmax q_k on every column
    g_value = g_yhat + (g_ntl * base_scale * dot_product_loss_grad(spec.ntl_kind, stats.yhat,
                                                                   rows.y)
                        if spec.ntl_kind not in ("was", None) else zero)

    p = torch.exp(zn - stats.nlse.unsqueeze(1))  # softmax over number tokens
    number_grad = torch.exp(zn - stats.lse.unsqueeze(1)) * (full_coef + g_mass_total).unsqueeze(1)
    number_grad += p * (g_value.unsqueeze(1) * (values - stats.yhat.unsqueeze(1)))
    if spec.ntl_kind == "was":
        d = number_distance(values, rows.y.unsqueeze(1), spec.squash)
        number_grad += p * ((g_ntl * base_scale).unsqueeze(1) * (d - stats.base.unsqueeze(1)))
    # q_k * full_coef = +-exp(z_k - lse + log|full_coef|); full_coef == 0 -> shift +inf -> 0
    shift = stats.lse - torch.log(full_coef.abs())
    return GradientTerms(shift, full_coef < 0, full_coef, number_grad, g_ce)
