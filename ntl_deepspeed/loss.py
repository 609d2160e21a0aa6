"""``ce_ntl``: the one front door. Validate once -> op (logits or hidden states) -> reductions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from .checks import (check_config_fits_vocab, check_gemm_dtype, check_head, check_label_dtype,
                     check_labels, check_logits, check_loss_weights, check_loss_weights_shape,
                     check_number_range, check_reduction, check_vocab_argument)
from .config import NTLConfig
from .number_level import assemble_numbers, symmetric_ape
from .numbers import NumberVocab, VocabShard, label_targets
from .ops.hidden import Blocking, hidden_statistics
from .ops.hidden_reduced import budget_token_chunk, reduced_hidden_statistics
from .ops.logits import logits_statistics
from .ops.math import reweigh
from .ops.header import fail_together, local_verdict
from .ops.statistics import OpSpec, PerToken
from .parallel import SequenceParallel, group_size


@dataclass
class CENTLOutput:
    """Reduced losses and per-token tensors (shaped like the labels)."""

    loss: torch.Tensor               # ce + weight * ntl (per token if reduction == "none")
    ce: torch.Tensor
    ntl: torch.Tensor
    ce_per_token: torch.Tensor       # 0 at ignored positions
    ntl_per_token: torch.Tensor      # 0 where no NTL applies
    predicted_value: torch.Tensor    # y-hat: expected value under the number-token softmax
    number_mass: torch.Tensor        # full-vocab probability on number tokens
    number_label_mask: torch.Tensor  # where the NTL applies
    valid_mask: torch.Tensor         # labels != ignore_index
    number_correct: torch.Tensor     # at number labels: the label alone is the most likely number
    label_value: torch.Tensor        # value of the label token (0 where it is not a number)
    number_token_label: torch.Tensor # the label is a number token (whatever the NTL kind)
    ntl_count: torch.Tensor          # summed weights under the NTL (this call, not all-reduced)
    ce_count: torch.Tensor           # summed weights of valid tokens


def ce_ntl(labels: torch.Tensor, shard: Union[VocabShard, NumberVocab],
           config: Optional[NTLConfig] = None, *, logits: Optional[torch.Tensor] = None,
           hidden: Optional[torch.Tensor] = None, head_weight: Optional[torch.Tensor] = None,
           head_bias: Optional[torch.Tensor] = None,
           loss_weights: Optional[torch.Tensor] = None, reduction: str = "mean",
           dp_group=None, gemm_dtype: Optional[torch.dtype] = None,
           sp_group=None, sp_grads_averaged: bool = False) -> CENTLOutput:
    """CE + ``config.weight`` * NTL, from this rank's ``logits`` ``[..., V_local]``, or from
    ``hidden`` ``[..., H]`` and this rank's rows of the LM head ``head_weight`` ``[V_local, H]``
    (+ ``head_bias``) without materialising the logits (``config.fused_block_size`` /
    ``fused_token_chunk``; GEMM operands in ``gemm_dtype``: default fp32 on CPU, the input dtype
    on CUDA).

    ``labels`` are global ids (already shifted), identical on every rank of the shard's group.
    ``shard`` comes from :meth:`NumberVocab.shard_for` (a NumberVocab means the whole vocab on
    one rank). ``loss_weights`` multiply both losses per token. Reduction ``mean``: CE over valid
    tokens (``F.cross_entropy``'s mean), NTL per ``config.normalization``. Collectives
    (docs/API_CONTRACT.md#communication): 2 on the shard's group in forward -- per token chunk
    when the fused head computes the reduced loss's gradients in its forward -- plus one on
    ``dp_group`` for ``normalization='global'``; none in backward. No host synchronisation
    unless ``config.check_inputs`` / ``check_finite``.

    Sequence parallelism (``sp_group``: the ranks holding slices of the same sequences, e.g.
    DeepSpeed Ulysses; ``dp_group`` then spans data x sequence parallel ranks): see
    :func:`token_weights` -- two more all-reduces of 2 floats on ``sp_group`` in forward
    (``reduction="mean"``; ``"sum"``/``"none"`` stay this rank's tokens). ``out.loss``,
    ``out.ce``, ``out.ntl`` are then the whole micro-batch's values, with this rank's share as
    their gradient.
    ``sp_grads_averaged``: the framework averages gradients over ``sp_group`` (DeepSpeed ZeRO-3)
    instead of summing them (ZeRO 0-2).
    """
    config = config or NTLConfig()
    if not isinstance(config, NTLConfig):
        raise TypeError(f"config must be an NTLConfig, got {type(config).__name__}")
    check_vocab_argument(shard)
    check_gemm_dtype(gemm_dtype)
    check_config_fits_vocab(config, shard.vocab if isinstance(shard, VocabShard) else shard)
    if (logits is None) == (hidden is None) or (hidden is None) != (head_weight is None):
        raise TypeError("ce_ntl takes logits=..., or hidden=... with head_weight=...")
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    parallel = isinstance(shard, VocabShard) and shard.parallel
    try:  # checks of this rank's own arguments: a tensor-parallel rank failing one alone
        shard = _checked_shard(labels, shard, config, logits, hidden, head_weight, head_bias,
                               loss_weights, reduction, gemm_dtype)
    except (TypeError, ValueError) as problem:
        if parallel:  # ... takes the others along through the first collective
            fail_together(shard, labels.numel(), OpSpec.build(config, shard), problem)
        raise
    spec = OpSpec.build(config, shard)
    if shard.parallel:  # value checks travel in the header: every rank raises together
        spec = dataclasses.replace(spec, verdict=local_verdict(
            labels, loss_weights, shard.vocab_size, config.ignore_index))
    else:
        check_loss_weights(loss_weights, labels, host=config.check_inputs)
        check_labels(labels, shard.vocab_size, config.ignore_index, host=config.check_inputs)

    sp = SequenceParallel.of(sp_group, sp_grads_averaged)
    if logits is not None:
        per_token = logits_statistics(logits, labels, shard, spec, config.backend)
    elif _reduced_loss_gradients(config, reduction, loss_weights, hidden, head_weight,
                                 head_bias):
        return _fused_reduced(labels, shard, config, spec, hidden, head_weight, head_bias,
                              loss_weights, reduction, dp_group, gemm_dtype, sp)
    else:
        blocking = Blocking.build(hidden, config.fused_block_size, config.fused_token_chunk,
                                  gemm_dtype)
        per_token = hidden_statistics(hidden, head_weight, head_bias, labels, shard, spec,
                                      blocking)
    return reduce_per_token(PerToken(*per_token), labels, shard, config, loss_weights,
                            reduction, dp_group, sp)


def _checked_shard(labels, shard, config: NTLConfig, logits, hidden, head_weight, head_bias,
                   loss_weights, reduction: str, gemm_dtype) -> VocabShard:
    """Shapes, types and number range of this rank's arguments (host facts only); the shard."""
    check_label_dtype(labels)
    if logits is not None:
        check_logits(logits, labels)
        width, device, dtype = logits.shape[-1], logits.device, logits.dtype
    else:
        check_head(hidden, head_weight, head_bias, labels)
        width, device, dtype = head_weight.shape[0], hidden.device, hidden.dtype
        if gemm_dtype is not None and torch.finfo(gemm_dtype).max < torch.finfo(dtype).max:
            dtype = gemm_dtype
    if isinstance(shard, NumberVocab):
        shard = shard.shard_for(width, device=device)
    if shard.width != width:
        raise ValueError(f"the shard is {shard.width} columns wide but the "
                         f"{'logits have' if logits is not None else 'head has'} {width}")
    check_reduction(reduction)
    check_loss_weights_shape(loss_weights, labels)
    check_number_range(config, shard.vocab, dtype)
    return shard


def _reduced_loss_gradients(config: NTLConfig, reduction: str, loss_weights, *head) -> bool:
    """The fused head computes the reduced loss's gradients in its forward when a backward can
    follow and the reduced loss is linear in the per-token CE / NTL (not number-level NTL, not
    differentiable loss weights). See docs/fused_head.md."""
    return (reduction != "none" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in head)
            and not (config.enabled and config.kind == "number_level")
            and not (loss_weights is not None and loss_weights.requires_grad))


def _fused_reduced(labels, shard, config, spec, hidden, head_weight, head_bias, loss_weights,
                   reduction, dp_group, gemm_dtype, sp) -> CENTLOutput:
    valid, is_number, _ = label_targets(labels, shard.values, config.ignore_index)
    sp = sp if reduction == "mean" else None  # "sum" stays this rank's tokens
    weights = token_weights(valid, is_number, loss_weights, config, reduction, dp_group, sp)
    coef_ce, coef_ntl = weights.loss_coefficients(config.active_weight)
    chunk = config.fused_token_chunk or budget_token_chunk(
        labels.numel(), head_weight.shape[0], hidden.shape[-1])
    blocking = Blocking.build(hidden, config.fused_block_size, chunk, gemm_dtype)
    per_token, anchor = reduced_hidden_statistics(hidden, head_weight, head_bias, labels,
                                                  coef_ce, coef_ntl, shard, spec, blocking)
    out = reduce_per_token(PerToken(*per_token), labels, shard, config, loss_weights, reduction,
                           dp_group, sp, weights)
    # the loss's gradient flows through the anchor only (per-token outputs keep theirs)
    out.loss = out.loss.detach() + anchor
    return out


def _number_level(labels, shard: VocabShard, config: NTLConfig, per_token: PerToken,
                  is_digit, y):
    """Per-number symmetric APE at each number's first digit (ntloss' NumberLevelLoss)."""
    rows = labels.shape if labels.dim() == 2 else (1, labels.numel())  # numbers run along rows
    is_dot = None
    if config.float_level:
        if shard.vocab.decimal_point_id is None:
            raise ValueError("float_level=True needs a '.' token in the vocabulary")
        is_dot = (labels == shard.vocab.decimal_point_id).reshape(rows)
    y_num, yhat_num, start = assemble_numbers(y.reshape(rows), per_token.yhat.reshape(rows),
                                              is_digit.reshape(rows), is_dot)
    loss = symmetric_ape(yhat_num, y_num)
    if config.reweigh:
        loss = reweigh(loss, per_token.mass.reshape(rows),
                       shard.vocab.max_distance("number_level"))
    start = start.reshape(labels.shape)
    return torch.where(start, loss.reshape(labels.shape), torch.zeros_like(per_token.yhat)), start


def _replica_count(count: torch.Tensor, dp_group, sp: Optional[SequenceParallel]):
    """(``count`` summed over ``dp_group``, the number of DP replicas in it: its size, over the
    SP size when ``dp_group`` spans data x sequence parallel ranks)."""
    size = group_size(dp_group)
    if size == 1:
        return count, 1
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total, size // sp.size if sp is not None else size


@dataclass
class TokenWeights:
    """Each token's weight in the reduced CE and NTL, and the divisors of their sums: all known
    from the labels (and ``loss_weights``) before the op runs (:func:`token_weights`)."""

    ce_w: torch.Tensor
    ntl_w: torch.Tensor
    ce_count: torch.Tensor
    ntl_count: torch.Tensor
    ce_div: torch.Tensor
    ntl_div: torch.Tensor
    sp: Optional[SequenceParallel] = None

    def loss_coefficients(self, ntl_weight: float):
        """d loss / d ce_t and d loss / d ntl_t of the reduced ``loss = ce + ntl_weight * ntl``
        (this rank's share, scaled as :meth:`SequenceParallel.share` scales it)."""
        grad_scale = self.sp.size if self.sp is not None and self.sp.grads_averaged else 1
        return (self.ce_w * (grad_scale / self.ce_div),
                self.ntl_w * (ntl_weight * grad_scale / self.ntl_div))

    def reduce(self, ce: torch.Tensor, ntl: torch.Tensor):
        """(CE, NTL) of ``reduction="mean"``/``"sum"`` from per-token values. Under sequence
        parallelism: the whole micro-batch's values (the sums all-reduced over ``sp.group``), with
        this rank's share as their gradient."""
        ce_sum, ntl_sum = (ce * self.ce_w).sum(), (ntl * self.ntl_w).sum()
        ce_r, ntl_r = ce_sum / self.ce_div, ntl_sum / self.ntl_div
        if self.sp is None:
            return ce_r, ntl_r
        totals = self.sp.sum(torch.stack([ce_sum, ntl_sum]).detach())
        return (self.sp.share(ce_r, totals[0] / self.ce_div),
                self.sp.share(ntl_r, totals[1] / self.ntl_div))


def token_weights(valid, ntl_mask, loss_weights, config: NTLConfig, reduction: str, dp_group,
                  sp: Optional[SequenceParallel] = None) -> TokenWeights:
    """The one normalisation rule for every layout (docs/API_CONTRACT.md, "Normalisation across
    layouts"). ``reduction="mean"`` divides by the counts of the *whole micro-batch* (all its TP
    shards and SP slices): CE per valid token; NTL per number label (``micro_batch``), per
    valid token (``token``), or per number label of the whole DP batch over the number of DP
    replicas (``global``: counted over ``dp_group``; DeepSpeed/Megatron average gradients over
    the replicas). Under sequence parallelism the counts are all-reduced over ``sp.group`` (one
    all-reduce of 2 floats; :meth:`TokenWeights.reduce` adds one of the 2 sums)."""
    w = torch.ones(valid.shape, device=valid.device) if loss_weights is None \
        else loss_weights.float()
    ce_w = torch.where(valid, w, torch.zeros_like(w))
    ntl_w = torch.where(ntl_mask, w, torch.zeros_like(w))
    ce_count, ntl_count = ce_w.sum(), ntl_w.sum()
    if reduction != "mean":
        one = torch.ones_like(ce_count)
        return TokenWeights(ce_w, ntl_w, ce_count, ntl_count, one, one)
    eps = torch.finfo(ce_count.dtype).eps
    ce_mb, ntl_mb = (ce_count, ntl_count) if sp is None else \
        sp.sum(torch.stack([ce_count, ntl_count]).detach()).unbind()
    ce_div = ce_mb.clamp_min(eps)
    if config.normalization == "micro_batch":
        ntl_div = ntl_mb.clamp_min(eps)
    elif config.normalization == "token":
        ntl_div = ce_div
    else:  # global
        total, replicas = _replica_count(ntl_count, dp_group, sp)
        ntl_div = total.clamp_min(eps) / replicas
    return TokenWeights(ce_w, ntl_w, ce_count, ntl_count, ce_div, ntl_div, sp)


def reduce_per_token(per_token: PerToken, labels: torch.Tensor, shard: VocabShard,
                     config: NTLConfig, loss_weights, reduction: str, dp_group,
                     sp: Optional[SequenceParallel] = None,
                     weights: Optional[TokenWeights] = None) -> CENTLOutput:
    """Number-level assembly, weights and reductions on the op's per-token outputs
    (``weights``: already computed by :func:`token_weights`)."""
    ce, ntl = per_token.ce, per_token.ntl
    valid, is_number, label_value = label_targets(labels, shard.values, config.ignore_index)
    ntl_mask = is_number
    if config.enabled and config.kind == "number_level":
        if sp is not None:
            raise ValueError(SequenceParallel.NUMBER_LEVEL)
        ntl, ntl_mask = _number_level(labels, shard, config, per_token, is_number, label_value)
    if weights is None:
        weights = token_weights(valid, ntl_mask, loss_weights, config, reduction, dp_group,
                                sp if reduction == "mean" else None)
    if reduction == "none":
        ce_r, ntl_r = ce * weights.ce_w, ntl * weights.ntl_w
    else:
        ce_r, ntl_r = weights.reduce(ce, ntl)
    return CENTLOutput(ce_r + config.active_weight * ntl_r, ce_r, ntl_r, ce, ntl,
                       per_token.yhat, per_token.mass, ntl_mask, valid, per_token.correct,
                       label_value, is_number, weights.ntl_count, weights.ce_count)
