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
from .ops.logits import logits_statistics
from .ops.math import reweigh
from .ops.statistics import OpSpec, PerToken, fail_together, local_verdict
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
    tokens (``F.cross_entropy``'s mean), NTL per ``config.normalization``. Collectives: 2 on the
    shard's group in forward (see :mod:`ntl_deepspeed.ops.statistics`), plus one on ``dp_group``
    for ``normalization='global'``; none in backward. No host synchronisation unless
    ``config.check_inputs`` / ``check_finite``.

    Sequence parallelism (``sp_group``: the ranks holding slices of the same sequences, e.g.
    DeepSpeed Ulysses; ``dp_group`` then spans data x sequence parallel ranks): see
    :func:`normalise` -- one more all-reduce of 4 floats on ``sp_group`` in forward
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

    if logits is not None:
        per_token = logits_statistics(logits, labels, shard, spec, config.backend)
    else:
        blocking = Blocking.build(hidden, config.fused_block_size, config.fused_token_chunk,
                                  gemm_dtype)
        per_token = hidden_statistics(hidden, head_weight, head_bias, labels, shard, spec,
                                      blocking)
    return reduce_per_token(PerToken(*per_token), labels, shard, config, loss_weights,
                            reduction, dp_group, SequenceParallel.of(sp_group, sp_grads_averaged))


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


def normalise(ce_sum, ntl_sum, ce_count, ntl_count, normalization: str, dp_group,
              sp: Optional[SequenceParallel] = None):
    """(CE, NTL) of ``reduction="mean"``: the one normalisation rule for every layout.

    The denominators are those of the *whole micro-batch* (all its TP shards and SP slices):
    CE per valid token; NTL per number label (``micro_batch``), per valid token (``token``), or
    per number label of the whole DP batch (``global``: counted over ``dp_group``, scaled by the
    number of DP replicas because DeepSpeed/Megatron average gradients over them). Under
    sequence parallelism each rank's sums cover its slice only: the counts (and, for the value,
    the sums) are all-reduced over ``sp.group`` -- one all-reduce of 4 floats -- and each rank
    back-propagates only its share (values: the whole micro-batch's, identical on the SP ranks).
    """
    eps = torch.finfo(ce_sum.dtype).eps
    if sp is not None:
        totals = sp.sum(torch.stack([ce_count, ntl_count, ce_sum, ntl_sum]).detach())
        ce_count_mb, ntl_count_mb = totals[0], totals[1]
    else:
        ce_count_mb, ntl_count_mb = ce_count, ntl_count
    ce_den = ce_count_mb.clamp_min(eps)
    ntl_scale = 1
    if normalization == "micro_batch":
        ntl_den = ntl_count_mb.clamp_min(eps)
    elif normalization == "token":
        ntl_den = ce_den
    else:  # global
        ntl_den, ntl_scale = _replica_count(ntl_count, dp_group, sp)
    ce_r, ntl_r = ce_sum / ce_den, ntl_sum * ntl_scale / ntl_den
    if sp is None:
        return ce_r, ntl_r
    return sp.share(ce_r, totals[2] / ce_den), sp.share(ntl_r, totals[3] * ntl_scale / ntl_den)


def _replica_count(count: torch.Tensor, dp_group, sp: Optional[SequenceParallel]):
    """(``count`` summed over ``dp_group`` clamped > 0, number of DP replicas in it)."""
    size = group_size(dp_group)
    replicas = size // sp.size if sp is not None else size
    if size == 1:
        return count.clamp_min(torch.finfo(count.dtype).eps), 1
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total.clamp_min(torch.finfo(count.dtype).eps), replicas


def reduce_per_token(per_token: PerToken, labels: torch.Tensor, shard: VocabShard,
                     config: NTLConfig, loss_weights, reduction: str, dp_group,
                     sp: Optional[SequenceParallel] = None) -> CENTLOutput:
    """Number-level assembly, weights and reductions on the op's per-token outputs."""
    ce, ntl = per_token.ce, per_token.ntl
    valid, is_number, label_value = label_targets(labels, shard.values, config.ignore_index)
    ntl_mask = is_number
    if config.enabled and config.kind == "number_level":
        if sp is not None:
            raise ValueError(SequenceParallel.NUMBER_LEVEL)
        ntl, ntl_mask = _number_level(labels, shard, config, per_token, is_number, label_value)

    w = torch.ones_like(ce) if loss_weights is None else loss_weights.to(ce.dtype)
    ce_w = torch.where(valid, w, torch.zeros_like(w))
    ntl_w = torch.where(ntl_mask, w, torch.zeros_like(w))
    ce_count, ntl_count = ce_w.sum(), ntl_w.sum()
    if reduction == "none":
        ce_r, ntl_r = ce * ce_w, ntl * ntl_w
    elif reduction == "sum":
        ce_r, ntl_r = (ce * ce_w).sum(), (ntl * ntl_w).sum()
    else:
        ce_r, ntl_r = normalise((ce * ce_w).sum(), (ntl * ntl_w).sum(), ce_count, ntl_count,
                                config.normalization, dp_group, sp)
    return CENTLOutput(ce_r + config.active_weight * ntl_r, ce_r, ntl_r, ce, ntl,
                       per_token.yhat, per_token.mass, ntl_mask, valid, per_token.correct,
                       label_value, is_number, ntl_count, ce_count)
